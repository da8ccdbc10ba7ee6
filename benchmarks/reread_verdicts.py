"""The learned-vs-fixed reports re-read with mdmsearch's structure verdict.

`learned_vs_fixed.py` (without ``--fair``) judged its comparisons by its own rule, "better" beyond
2 paired SE.  This script reads the per-seed held-out BPDs those reports stored
(``per_seed_heldout_bpd`` of each entry) and judges the same comparisons as mdmsearch does
(``mdmsearch.compare.compare_structures``: a t test over seeds, paired by seed, 95% interval),
without training anything:

* each parameterization against ``eps`` for the same process (`mixed` with `floored` statistics);
* `global` against `floored` statistics for the same process;
* the best learned entry against the best fixed entry of each dataset (by mean held-out BPD).

    python benchmarks/reread_verdicts.py     # reports/benchmarks/learned_vs_fixed_reread.{json,md}
"""

from __future__ import annotations

import json

import numpy as np

from _common import ROOT, md_table, write

from mdmsearch.compare import compare_structures

REPORTS = ROOT / "reports" / "benchmarks"
SOURCES = ("learned_vs_fixed_digits", "learned_vs_fixed_mnist", "learned_vs_fixed_digits_global",
           "learned_vs_fixed_mnist_global")


def entries() -> dict[tuple[str, str, str], list[float]]:
    """{(dataset, process, variant): per-seed held-out BPD (seeds 0, 1, 2)} of every stored report."""
    out = {}
    for name in SOURCES:
        path = REPORTS / f"{name}.json"
        if not path.is_file():
            continue
        for row in json.loads(path.read_text())["rows"]:
            out[(row["dataset"], row["process"], row["variant"])] = list(row["per_seed_heldout_bpd"])
    return out


def judge(ds: str, a: tuple[str, str], b: tuple[str, str], res: dict) -> dict:
    """Entry a minus entry b, paired by seed, with the structure verdict and its 95% interval."""
    runs = [{s: np.array([v]) for s, v in enumerate(res[(ds, *key)])} for key in (a, b)]
    comp = compare_structures(*runs)
    lo, hi = comp.interval(0.05)
    return {"dataset": ds, "entry": f"{a[0]} [{a[1]}]", "minus": f"{b[0]} [{b[1]}]", "diff": comp.diff,
            "ci_low": lo, "ci_high": hi, "se": comp.se, "n_seeds": comp.n_seeds, "p_better": comp.p_better,
            "verdict": comp.verdict}


def comparisons(res: dict) -> list[dict]:
    rows = []
    for ds in sorted({k[0] for k in res}):
        have = {(p, v) for d, p, v in res if d == ds}
        for proc in sorted({p for p, _ in have}):
            if (proc, "mixed-floored") in have and (proc, "eps") in have:
                rows.append({"kind": "mixed (floored) - eps", **judge(ds, (proc, "mixed-floored"), (proc, "eps"), res)})
            if (proc, "mixed-global") in have and (proc, "mixed-floored") in have:
                rows.append({"kind": "global - floored",
                             **judge(ds, (proc, "mixed-global"), (proc, "mixed-floored"), res)})
        mean = {k: float(np.mean(res[(ds, *k)])) for k in have}
        fixed = [k for k in have if not k[0].startswith("learned")]
        learned = [k for k in have if k[0].startswith("learned")]
        if fixed and learned:
            rows.append({"kind": "best learned - best fixed",
                         **judge(ds, min(learned, key=mean.get), min(fixed, key=mean.get), res)})
    return rows


def main() -> None:
    rows = comparisons(entries())
    fmt = {"diff": "{:+.4f}", "ci_low": "{:+.4f}", "ci_high": "{:+.4f}", "se": "{:.4f}", "p_better": "{:.2f}"}
    text = ("Stored per-seed held-out BPDs of " + ", ".join(f"`{n}`" for n in SOURCES) + " (3 seeds each, "
            "nothing retrained), judged by mdmsearch's structure verdict: a t test over the 3 seeds paired by "
            "seed (2 df, so |diff| must exceed 4.30 SE), 95% interval.\n\n"
            + md_table(rows, ["kind", "dataset", "entry", "minus", "diff", "ci_low", "ci_high", "se", "p_better",
                              "verdict"], fmt))
    print(write("learned_vs_fixed_reread", {"rows": rows, "sources": list(SOURCES)}, text))


if __name__ == "__main__":
    main()
