"""The confirmation race as pure functions of per-seed results (no Optuna, no files).

``confirm.py`` feeds :func:`replay` what the confirmation trials have produced so far and
enqueues what it asks for; the tests and ``benchmarks/race_power.py`` feed it synthetic
per-seed BPDs and so simulate the race exactly as the product runs it.

Rounds and margin seeds.  Round r trains the candidates still racing on fresh seed
``seed_start + r - 1``.  The winner's **margin seeds** are the rounds that did not pick it: every
round for the incumbent (the search picked it on other seeds), the rounds after the switch for a
challenger that beat the incumbent (the rounds up to the switch picked it).  A look happens
when the margin seeds reach a count n with a level in the schedule (:func:`schedule`).

Error control (docs/comparisons.md has the derivation).  Every look tests at its own two-sided
level a_n, and the levels of every look the race can ever take, reopened segments included, sum
to at most ALPHA, so P(any decided verdict | no difference) <= sum a_n <= ALPHA by the union
bound, whatever the stopping rule:

* segment 0 (the race's own horizon H_0, looks from ``min_seeds`` on) spends FIRST_SHARE * ALPHA:
  each interim look INTERIM (a stop before the last look needs p < 0.001, Haybittle-Peto), the
  last look the rest;
* a reopened segment j >= 1 (``mdmsearch confirm --seeds H_j``) spends REOPEN_SHARE * ALPHA / 2^j;
* a switched winner's margin seeds restart the schedule: its verification is an independent
  test that happens only after a false switch (probability <= (top_k - 1) * a / 2 under the null).

The reported verdict (the winner's margin on the test split) is tested at the level of its
segment's *last* look, wherever the race stopped: stopping at an interim look k needs the
validation statistic past its level a_k, an event of probability <= a_k under the null, so
P(reported better or worse) <= sum of the interim a_k + a_last = the segment's budget; a margin
that crossed the strict early boundary on validation does not fall back to a tie on test.

Decided verdicts stay decided, and a challenger decided worse stays dropped: nothing re-tests a
decision on more (or fewer) seeds.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import numpy as np

from ..compare import ALPHA, StructureComparison, compare_structures

FIRST_SHARE = 0.8  # of ALPHA: the race's own looks (0.04 two-sided)
REOPEN_SHARE = 0.12  # of ALPHA, over all reopened segments: 0.003, 0.0015, ... (0.006 in all)
INTERIM = 0.001  # two-sided level of a look before a segment's last (an early stop)
DECIDED = ("better", "worse")


def segment_budget(j: int) -> float:
    """Two-sided level spent by segment j (0: the race's own; j >= 1: the j-th reopening)."""
    return ALPHA * FIRST_SHARE if j == 0 else ALPHA * REOPEN_SHARE / 2 ** j


def schedule(horizons: list[int], min_seeds: int) -> dict[int, float]:
    """{margin seeds n: two-sided level of the look at n}.  Segment j's looks are n = its first
    count .. H_j; each interim look gets min(INTERIM, b_j / (2 m)) of its budget b_j (m interim
    looks), the last look the rest, so the segment spends exactly b_j."""
    levels: dict[int, float] = {}
    first = min_seeds
    for j, last in enumerate(horizons):
        if last < first:
            continue
        budget, m = segment_budget(j), last - first
        interim = min(INTERIM, budget / (2 * m)) if m else 0.0
        levels.update({n: interim for n in range(first, last)})
        levels[last] = budget - m * interim
        first = last + 1
    return levels


@dataclass
class Race:
    """Where the race stands after the rounds played so far."""

    winner: str
    done: bool = False
    train: tuple = ()  # groups to train in ``next_round`` (empty when done)
    next_round: int = 1
    switched_at: Optional[int] = None  # the round a challenger was decided better than the incumbent
    margin_rounds: tuple = ()  # the winner's selection-free rounds behind ``decision``
    decision: Optional[StructureComparison] = None  # winner vs baseline at the last look (validation)
    decided_at: Optional[int] = None  # the round whose look decided it (None: not decided)
    report_level: float = field(default_factory=lambda: segment_budget(0))  # the last look's level of its segment
    challengers: dict = field(default_factory=dict)  # group -> {"comparison", "round", "status"}
    looks: list = field(default_factory=list)  # [{"round", "n", "level", "verdict"}]

    @property
    def level(self) -> float:
        """The level of the reported verdict (see the module's docstring)."""
        return self.report_level


def paired_on(a: dict, b: dict, rounds, level: float) -> Optional[StructureComparison]:
    """A minus B over the given rounds that both have ({round: per-example array}), paired by
    seed, tested at the two-sided ``level``; None without any common round."""
    common = [r for r in rounds if a.get(r) is not None and b.get(r) is not None]
    if not common:
        return None
    comp = compare_structures({r: a[r] for r in common}, {r: b[r] for r in common})
    return replace(comp, alpha=level) if comp is not None else None


def _challenger_look(race: Race, values: dict, active: list, inc: str, r: int, level: float, last: bool) -> list:
    """Tests every active challenger against the incumbent on rounds 1..r; returns those still
    active.  Better: the lowest one becomes the winner (a switch); worse: dropped for good."""
    better = []
    for g in active:
        comp = paired_on(values.get(g, {}), values.get(inc, {}), range(1, r + 1), level)
        verdict = comp.verdict if comp is not None else None
        if verdict in DECIDED or last:
            race.challengers[g] = {"comparison": comp, "round": r, "status": verdict if verdict in DECIDED else "tie"}
        if verdict == "better":
            better.append((comp.diff, g))
    if better:
        race.winner = min(better)[1]
        race.switched_at = r
        race.decision, race.decided_at = None, None  # the incumbent's verdict no longer speaks for the winner
        for g in active:
            race.challengers.setdefault(g, {"comparison": None, "round": r, "status": "stopped"})
        return []
    return [g for g in active if g not in race.challengers]


def _baseline_look(race: Race, values: dict, base: str, margin: tuple, level: float, report_level: float) -> None:
    """The winner against the baseline on its margin rounds, at the look's level."""
    race.decision = paired_on(values.get(race.winner, {}), values.get(base, {}), margin, level)
    race.margin_rounds, race.report_level = margin, report_level
    verdict = race.decision.verdict if race.decision is not None else None
    race.looks.append({"round": margin[-1], "n": len(margin), "level": level, "verdict": verdict})
    if verdict in DECIDED:
        race.decided_at = margin[-1]


def replay(candidates: list[dict], values: dict, horizons: list[int], min_seeds: int, rounds: int) -> Race:
    """The race after ``rounds`` rounds.  ``candidates``: [{"group", "role"}] (one incumbent, one
    baseline, challengers); ``values``: {group: {round: per-example (or one-element) array}} on
    the deciding split; ``horizons``: margin seeds per segment (the race's, then reopenings')."""
    role = {c["role"]: c["group"] for c in candidates if c["role"] != "challenger"}
    inc, base = role["incumbent"], role["baseline"]
    race = Race(winner=inc)
    active = [c["group"] for c in candidates if c["role"] == "challenger"]
    levels, start = schedule(horizons, min_seeds), 1
    for r in range(1, rounds + 1):
        n = r - start + 1  # the winner's margin seeds so far
        if n in levels and race.switched_at is None and active:
            active = _challenger_look(race, values, active, inc, r, levels[n], n == horizons[0])
            if race.switched_at == r:  # the rounds so far picked the new winner: its margin starts after them
                start = r + 1
                continue
        if n in levels and race.decided_at is None:
            _baseline_look(race, values, base, tuple(range(start, r + 1)), levels[n],
                           levels[min(h for h in horizons if h >= n)])
        if (race.decided_at is not None and not active) or n >= horizons[-1]:
            race.done = True
            return race
    race.next_round = rounds + 1
    # still racing: the winner, the baseline while undecided, the challengers not yet decided
    race.train = (race.winner,) + ((base,) if race.decided_at is None else ()) + tuple(active)
    return race


def reported(race: Race, values: dict, baseline: str) -> Optional[StructureComparison]:
    """The winner's margin to the baseline on another split (``values`` as in :func:`replay`):
    its margin rounds only, at the level of the look that ended the race."""
    return paired_on(values.get(race.winner, {}), values.get(baseline, {}), race.margin_rounds, race.level)


def simulate(candidates: list[dict], draw: Callable[[str, int], tuple], horizons_list: list[list[int]],
             min_seeds: int) -> list[tuple[Race, Optional[StructureComparison]]]:
    """Plays the race with ``draw(group, round) -> (validation, test)`` per-seed BPDs, as
    ``confirm.next_step`` plays it with trained trials, then reopens it with each further
    horizon list (``[[3], [3, 6]]``: the race, then ``mdmsearch confirm --seeds 6``); one
    (race, reported test verdict) per ending."""
    val: dict = {}
    test: dict = {}
    rounds, out = 0, []
    base = next(c["group"] for c in candidates if c["role"] == "baseline")
    for horizons in horizons_list:
        race = replay(candidates, val, horizons, min_seeds, rounds)
        while not race.done:
            for g in race.train:
                v, t = draw(g, race.next_round)
                val.setdefault(g, {})[race.next_round] = np.array([v], dtype=np.float64)
                test.setdefault(g, {})[race.next_round] = np.array([t], dtype=np.float64)
            rounds = race.next_round
            race = replay(candidates, val, horizons, min_seeds, rounds)
        out.append((race, reported(race, test, base)))
    return out


__all__ = ["FIRST_SHARE", "INTERIM", "REOPEN_SHARE", "Race", "paired_on", "replay", "reported", "schedule",
           "segment_budget", "simulate"]
