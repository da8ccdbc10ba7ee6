"""Error rates and power of the confirmation race, simulated with the product's own race
(``mdmsearch.search.race.simulate``: the functions ``confirm.py`` plays the race with) on
synthetic per-seed BPDs.

Units are seed SDs: every run's mean held-out BPD is its configuration's mean plus a seed effect
of variance 1, of which the share ``rho`` is common to every configuration trained on that seed
(what pairing by seed removes; the per-seed difference of two configurations has SD
sqrt(2 (1 - rho))), plus evaluation noise of SD 0.1 on each split.  The incumbent and the
challengers are equal; the baseline is worse by ``gap`` seed SDs (gap 0: the null).  A race is
"better" when its reported verdict (the test split of the winner's margin seeds) says better.

    python benchmarks/race_power.py --quick
    python benchmarks/race_power.py        # reports/benchmarks/race_power.{json,md}
"""

from __future__ import annotations

import argparse
import time

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
            common[round_] = rng.normal(0.0, np.sqrt(rho))
        s = (gap if group == "base" else 0.0) + common[round_] + rng.normal(0.0, np.sqrt(1.0 - rho))
        return s + rng.normal(0.0, 0.1), s + rng.normal(0.0, 0.1)

    return draw


def cell(top_k: int, seeds: int, gap: float, rho: float, n: int, seed: int) -> dict:
    """One setting: rates of better / any decided verdict, mean seeds per race, mean CI half-width."""
    rng = np.random.default_rng(seed)
    better = decided = 0
    rounds, widths = [], []
    for _ in range(n):
        [(state, rep)] = simulate(_candidates(top_k), _draw(rng, gap, rho), [[seeds]], 2)
        verdict = rep.verdict if rep is not None else None
        better += verdict == "better"
        decided += verdict in ("better", "worse")
        rounds.append(max(state.margin_rounds) if state.margin_rounds else 0)
        if rep is not None and rep.decided:
            widths.append(rep.half_width(rep.alpha))
    return {"top_k": top_k, "seeds": seeds, "gap_sd": gap, "rho": rho, "races": n, "better": better / n,
            "decided": decided / n, "mean_rounds": float(np.mean(rounds)),
            "ci_half_width_sd": float(np.mean(widths)) if widths else float("nan"),
            "last_level": schedule([seeds], 2)[seeds]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few races per setting (a smoke run)")
    ap.add_argument("--races", type=int, default=300)
    args = ap.parse_args()
    n = 40 if args.quick else args.races
    t0 = time.time()
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
