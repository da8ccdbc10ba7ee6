"""Error rates and power of the confirmation race, simulated with the product's own race
(``mdmsearch.search.race.simulate``: the functions ``confirm.py`` plays the race with) on
synthetic per-seed BPDs.

Units are seed SDs: every run's mean held-out BPD is its configuration's mean plus a seed effect
of variance 1, of which the share ``rho`` is common to every configuration trained on that seed
(what pairing by seed removes; the per-seed difference of two configurations has SD
sqrt(2 (1 - rho))), plus evaluation noise of SD 0.1 on each split.  The incumbent and the
challengers are equal; the baseline is worse by ``gap`` seed SDs (gap 0: the null).  A race is
"better" when its reported verdict (the test split of the winner's margin seeds) says better.

A negative ``rho`` (what seed_streams.py measured for the aux3 winner against VPSDE, about -0.45)
makes the baseline's seed effect anti-correlated with the others' (the per-seed difference SD is
then above sqrt(2) seed SDs).

    python benchmarks/race_power.py --quick
    python benchmarks/race_power.py        # reports/benchmarks/race_power.{json,md}
    python benchmarks/race_power.py --spec search_spaces/aux3.yaml   # that spec's race: race_power_aux3.{json,md}
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from _common import md_table, write

from mdmsearch.search.race import schedule, simulate


def _candidates(top_k: int) -> list[dict]:
    return ([{"group": "inc", "role": "incumbent"}, {"group": "base", "role": "baseline"}]
            + [{"group": f"c{i}", "role": "challenger"} for i in range(top_k - 1)])


def _draw(rng, gap: float, rho: float):
    common: dict = {}

    def draw(group: str, round_: int):
        if round_ not in common:
            common[round_] = rng.normal(0.0, np.sqrt(abs(rho)))
        shared = -common[round_] if rho < 0 and group == "base" else common[round_]  # rho < 0: anti-correlated
        s = (gap if group == "base" else 0.0) + shared + rng.normal(0.0, np.sqrt(1.0 - abs(rho)))
        return s + rng.normal(0.0, 0.1), s + rng.normal(0.0, 0.1)

    return draw


def cell(top_k: int, seeds: int, gap: float, rho: float, n: int, seed: int, min_seeds: int = 2) -> dict:
    """One setting: rates of better / any decided verdict, mean seeds per race, mean half-width of
    the reported interval (at the race's level) and of the 95% interval on the same seeds."""
    rng = np.random.default_rng(seed)
    better = decided = 0
    rounds, widths, widths95 = [], [], []
    for _ in range(n):
        [(state, rep)] = simulate(_candidates(top_k), _draw(rng, gap, rho), [[seeds]], min_seeds)
        verdict = rep.verdict if rep is not None else None
        better += verdict == "better"
        decided += verdict in ("better", "worse")
        rounds.append(max(state.margin_rounds) if state.margin_rounds else 0)
        if rep is not None and rep.decided:
            widths.append(rep.half_width(rep.alpha))
            widths95.append(rep.half_width(0.05))
    return {"top_k": top_k, "seeds": seeds, "min_seeds": min_seeds, "gap_sd": gap, "rho": rho, "races": n,
            "better": better / n, "decided": decided / n, "mean_rounds": float(np.mean(rounds)),
            "ci_half_width_sd": float(np.mean(widths)) if widths else float("nan"),
            "ci95_half_width_sd": float(np.mean(widths95)) if widths95 else float("nan"),
            "last_level": schedule([seeds], min_seeds)[seeds]}


def spec_rows(path: str, n: int) -> tuple[str, list[dict]]:
    """The race of a spec's ``confirm:`` block (seeds, min_seeds, top_k) under the null and at
    gaps of 0.5-2 seed SDs, for the seed correlations measured (-0.45) and two others."""
    from mdmsearch.search.spec import load_spec

    c = load_spec(path, {}).confirm
    rows = [cell(c.top_k, c.seeds, gap, rho, n, seed=7919 * (1 + int(10 * gap)) + int(100 * rho) + 1000,
                 min_seeds=c.min_seeds)
            for rho in (-0.45, 0.0, 0.5) for gap in (0.0, 0.5, 1.0, 1.5, 2.0)]
    return f"{path}: confirm seeds {c.seeds}, min_seeds {c.min_seeds}, top_k {c.top_k}", rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few races per setting (a smoke run)")
    ap.add_argument("--races", type=int, default=300)
    ap.add_argument("--spec", default=None, help="simulate this search spec's confirmation race instead of the grid")
    args = ap.parse_args()
    n = 40 if args.quick else args.races
    t0 = time.time()
    if args.spec:
        what, rows = spec_rows(args.spec, n)
        cols = ["rho", "gap_sd", "better", "decided", "mean_rounds", "ci_half_width_sd", "ci95_half_width_sd",
                "last_level"]
        fmt = {"better": "{:.3f}", "decided": "{:.3f}", "mean_rounds": "{:.1f}", "ci_half_width_sd": "{:.2f}",
               "ci95_half_width_sd": "{:.2f}", "last_level": "{:.4f}", "rho": "{:.2f}", "gap_sd": "{:.1f}"}
        text = (f"{what}; {n} races per row, {time.time() - t0:.0f} s.  gap_sd: how much worse the baseline is, "
                "in seed SDs (0: the null); rho: the correlation of two configurations' seed effects; "
                "ci_half_width_sd: the reported interval's half-width (at the race's level, last_level), "
                "ci95_half_width_sd: the 95% interval's on the same seeds, both in seed SDs.\n\n"
                + md_table(rows, cols, fmt))
        name = "race_power_" + Path(args.spec).stem + ("_quick" if args.quick else "")
        print(write(name, {"spec": args.spec, "rows": rows}, text))
        return
    rows = [cell(2, seeds, gap, rho, n, seed=1000 * seeds + int(10 * gap) + int(100 * rho))
            for rho in (0.0, 0.5, 0.85) for seeds in (3, 6, 10, 20) for gap in (0.0, 1.0, 2.0, 3.0)]
    cols = ["rho", "seeds", "gap_sd", "better", "decided", "mean_rounds", "ci_half_width_sd", "last_level"]
    fmt = {"better": "{:.3f}", "decided": "{:.3f}", "mean_rounds": "{:.1f}", "ci_half_width_sd": "{:.2f}",
           "last_level": "{:.4f}", "rho": "{:.2f}", "gap_sd": "{:.1f}"}
    text = (f"top_k 2, min_seeds 2, {n} races per row, {time.time() - t0:.0f} s.  gap_sd: how much worse the "
            "baseline is, in seed SDs (0: the null; `better` is then the false-better rate); rho: the share of "
            "the seed variance common to configurations on one seed; ci_half_width_sd: the reported interval's "
            "half-width in seed SDs.\n\n" + md_table(rows, cols, fmt))
    print(write("race_power" + ("_quick" if args.quick else ""), {"rows": rows}, text))


if __name__ == "__main__":
    main()
