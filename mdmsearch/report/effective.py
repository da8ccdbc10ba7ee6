"""The report's section "What training made of the structures" (docs/math.md section 9): for the
top learned configurations, the auxiliaries' share of the precision about x0 and the effective
structure at the start and at the end of training, and along training from the evaluations'
history (each run's coupling.json); and the headline's sentence when top configurations
collapsed to a smaller effective structure."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import data as D
from .render import Section

COUPLING_FILE = "coupling.json"  # a run's coupling history (written by mdmsearch.training.artifacts)
HEADLINE_TOP = 3  # the headline speaks of this many top learned configurations
SHARE_FLOOR = 1e-6  # log-scale floor of the figure (an exactly decoupled process has share 0)


@dataclass
class Trajectory:
    """One configuration's best-seed run: its coupling at the start, at each evaluation, at the end."""

    entry: D.Entry
    start: Optional[dict]
    history: list[dict]
    end: Optional[dict]


def read_trajectory(entry: D.Entry) -> tuple[Optional[Trajectory], str]:
    """The trajectory of ``entry``'s best seed, or None and why there is none."""
    art = D.text((entry.rep or {}).get("artifact_dir"))
    if not art:
        return None, "the leaderboard row has no artifact directory"
    path = Path(art) / COUPLING_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None, f"no {COUPLING_FILE} in {art} (a run from before the coupling was measured)"
    except (OSError, ValueError) as exc:
        return None, f"{path} unreadable ({exc})"
    return Trajectory(entry, data.get("start"), list(data.get("history") or []), data.get("end")), ""


def collapse_sentence(table: D.Table, top: int = HEADLINE_TOP) -> str:
    """'Training collapsed 2 of the top 3 learned configurations ...' (empty when none did, or when
    no row carries an effective structure)."""
    learned = [e for e in table.all_entries if not e.baseline and e.complete][:top]
    known = [e for e in learned if e.eff_n_aux is not None and e.n_aux]
    gone = [e for e in known if e.eff_n_aux < e.n_aux]
    if not gone:
        return ""
    what = "; ".join(f"#{e.rank} K={e.n_aux} -> {e.eff_structure}" for e in gone)
    return (f"Training collapsed {len(gone)} of the top {len(learned)} learned configurations to a smaller effective "
            f"structure ({what}): their auxiliaries carry (almost) nothing about the data, see \"What training made "
            f"of the structures\".")


def _line(t: Trajectory) -> str:
    e = t.entry
    start = f"{t.start['share']:.3g} ({t.start['label']})" if t.start else "not recorded"
    end = f"{t.end['share']:.3g} ({t.end['label']})" if t.end else "not recorded"
    verdict = ""
    if t.end:
        verdict = " — collapsed" if t.end["n_eff"] < t.end["n_aux"] else " — coupled"
    return f"#{e.rank} {e.label} (searched K={e.n_aux}): aux share at the start {start}, at the end {end}{verdict}."


def effective_section(ctx, draw) -> Section:
    """``ctx``: the report's context (table, work, top); ``draw``: its figure helper."""
    sec = Section("effective", "What training made of the structures",
                  "A searched structure says which entries of Q and D may be non-zero; training decides their "
                  "values. The aux share is the fraction of the precision about x0 in the diffused state z_t that "
                  "needs the auxiliary variables (mean over t; 0: the data coordinate alone knows everything, the "
                  "auxiliaries are switched off). The effective K counts the auxiliaries that matter (the smallest "
                  "set holding all but 1% of it, with the auxiliaries it flows through) and the effective structure "
                  "is the pattern of Q and D that remains among them (docs/math.md, section 9). Left: aux share at "
                  "the start and the end of training of each top learned configuration (best seed); middle: along "
                  "training (the reported, EMA, process at each evaluation); right: the largest |Q_x,v| (solid) "
                  "and |D_x,v| (dashed) along training.")
    picks = [e for e in ctx.table.all_entries if not e.baseline and e.complete][:ctx.top]
    found = []
    for e in picks:
        t, why = read_trajectory(e)
        if t is None:
            sec.notes.append(f"#{e.rank} {e.label}: {why}.")
            continue
        found.append(t)
        sec.notes.append(_line(t))
    if not picks:
        sec.notes.append("No learned structure has completed yet.")
    if found:
        draw(sec, ctx.work, "coupling.png", "Coupling of the auxiliaries to the data: start vs end, and along "
             "training.", lambda p: plot_coupling(found, p))
    return sec


def _cross(entry: dict, which: str) -> float:
    """max_j |M_x,j| over the auxiliaries j of an entry's Q or D (0 for K = 0)."""
    m = entry[which]
    return max((abs(v) for v in m[0][1:]), default=0.0)


def plot_coupling(trajs: list[Trajectory], path) -> Path:
    from .figures import _plt, _save

    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(14.0, 4.0))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, t in enumerate(trajs):
        c, name = colors[i % len(colors)], f"#{t.entry.rank} K={t.entry.n_aux}"
        ends = [(0, t.start), (1, t.end)]
        xs = [x for x, s in ends if s]
        axes[0].plot(xs, [max(s["share"], SHARE_FLOOR) for _, s in ends if s], marker="o", color=c, label=name)
        points = ([t.start] if t.start else []) + t.history
        steps = [p["step"] for p in points]
        axes[1].plot(steps, [max(p["share"], SHARE_FLOOR) for p in points], marker=".", color=c, label=name)
        axes[2].plot(steps, [_cross(p, "Q") for p in points], marker=".", color=c, label=f"{name} Q")
        axes[2].plot(steps, [_cross(p, "D") for p in points], ls="--", color=c)
    threshold = next((s["threshold"] for t in trajs for s in (t.end, t.start) if s), None)
    for ax in axes[:2]:
        ax.set_yscale("log")
        if threshold is not None:  # the effective-K threshold (dotted)
            ax.axhline(threshold, color="#999999", lw=0.8, ls=":")
        ax.set_ylabel("aux share of the precision about x0")
    axes[0].set_xticks([0, 1], ["start", "end"])
    axes[0].set_xlim(-0.3, 1.3)
    axes[1].set_xlabel("training step")
    axes[2].set_xlabel("training step")
    axes[2].set_ylabel("max |Q_x,v| (solid), max |D_x,v| (dashed)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def annotate_effective(table: D.Table, df) -> None:
    """Sets each completed entry's ``eff_n_aux`` and ``eff_structure`` from its rows (``df`` with the
    ``group`` column): the largest effective K over its seeds (a collapse is reported only when
    every seed collapsed) and that seed's effective structure.  Rows without the columns (written
    before the coupling was measured) leave them None."""
    if "eff_n_aux" not in df.columns:
        return
    done = df[(df["state"] == "COMPLETE") & df["eff_n_aux"].notna()]
    for e in table.all_entries:
        part = done[done["group"] == e.group]
        if e.group is None or part.empty:
            continue
        top = part.sort_values("eff_n_aux", ascending=False).iloc[0]
        e.eff_n_aux, e.eff_structure = int(top["eff_n_aux"]), D.text(top.get("eff_structure"))


__all__ = ["Trajectory", "annotate_effective", "collapse_sentence", "effective_section", "plot_coupling",
           "read_trajectory"]
