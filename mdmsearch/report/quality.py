"""The report's sample-quality section: BPD against KID per configuration (mean over seeds),
the Pareto front of the two, verdicts on KID over seeds against the best baseline, and the
sample grids of the Pareto members side by side.  Empty (one note) when no trial measured
sample quality (``budget.quality: null``)."""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..compare import compare_structures
from . import data as D
from .render import Figure, Section

MAX_GRIDS = 4  # Pareto members whose sample grids are shown


@dataclass
class QualityPoint:
    """One completed configuration: mean val BPD and mean KID over its seeds."""

    entry: D.Entry
    kid: dict  # {seed: KID of that seed's run}
    kid_se: float  # over seeds (n >= 2), else the one run's own KID standard error
    pareto: bool = False

    @property
    def kid_mean(self) -> float:
        return float(np.mean(list(self.kid.values())))


def quality_points(df, entries: list[D.Entry]) -> list[QualityPoint]:
    """The configurations with a measured KID, Pareto members marked (minimize BPD and KID)."""
    if "kid" not in df.columns:
        return []
    done = df[(df["state"] == "COMPLETE") & df["kid"].notna()]
    points = []
    for e in entries:
        part = done[done["group"] == e.group]
        if part.empty or not e.complete:
            continue
        kid = {int(s): float(k) for s, k in zip(part["seed"], part["kid"])}
        spread = float(np.std(list(kid.values()), ddof=1) / math.sqrt(len(kid))) if len(kid) > 1 else math.nan
        own = float(part["kid_se"].iloc[0]) if part["kid_se"].notna().any() else math.nan
        points.append(QualityPoint(e, kid, spread if len(kid) > 1 else own))
    for p in points:
        p.pareto = not any(dominates(q, p) for q in points if q is not p)
    return points


def dominates(a: QualityPoint, b: QualityPoint) -> bool:
    """a is at least as good on both objectives and better on one (both minimized)."""
    ab, ak, bb, bk = a.entry.val_mean, a.kid_mean, b.entry.val_mean, b.kid_mean
    return ab <= bb and ak <= bk and (ab < bb or ak < bk)


def kid_verdict(a: QualityPoint, b: QualityPoint) -> str:
    """A minus B in KID over seeds, the same t test as BPD verdicts (compare.compare_structures)."""
    res = compare_structures({s: np.array([k]) for s, k in a.kid.items()},
                             {s: np.array([k]) for s, k in b.kid.items()})
    if res is None:
        return "no comparison"
    lo, hi = res.interval(res.alpha) if res.decided else (None, None)
    ci = f" [{lo:+.3g}, {hi:+.3g}]" if res.decided else ""  # (the 95% interval)
    return f"{res.diff:+.3g}{ci} KID ({res.seeds_text()}): {res.verdict}"


def quality_section(ctx, draw) -> Section:
    """``ctx``: the report's context (df, table, work, where); ``draw``: its figure helper."""
    sec = Section("quality", "Sample quality",
                  "Validation BPD against the KID of each configuration's samples (mean over seeds; lower is "
                  "better on both), drawn at a fixed number of network evaluations from common noise and scored "
                  "against the training split (docs/quality.md). Filled markers are the Pareto front; open "
                  "squares the baselines.", layout="pair")
    points = quality_points(ctx.df, ctx.table.all_entries)
    if not points:
        sec.notes.append("No trial measured sample quality (budget.quality is null, or no trial completed).")
        return sec
    how = D.parse_json(points[0].entry.rep.get("quality")) if points[0].entry.rep else None
    if how:
        sec.notes.append(f"Measured with {how.get('n')} samples, sampler {how.get('sampler')} at "
                         f"{how.get('nfe')} NFE, features {how.get('features')}.")
    draw(sec, ctx.work, "pareto.png", "Validation BPD vs KID: the Pareto front of the configurations.",
         lambda p: plot_pareto(points, p))
    best_base = min((q for q in points if q.entry.baseline), key=lambda q: q.kid_mean, default=None)
    for q in sorted((q for q in points if q.pareto), key=lambda q: q.entry.val_mean):
        vs = f"; vs {best_base.entry.label}: {kid_verdict(q, best_base)}" if best_base and q is not best_base else ""
        sec.notes.append(f"Pareto: {q.entry.label} (val {q.entry.val_mean:.3f} bpd, KID {q.kid_mean:.3g} "
                         f"± {q.kid_se:.2g}, {len(q.kid)} seed(s)){vs}.")
    _grids(sec, ctx, [q for q in points if q.pareto][:MAX_GRIDS])
    return sec


def _grids(sec: Section, ctx, members: list[QualityPoint]) -> None:
    for i, q in enumerate(sorted(members, key=lambda q: q.entry.val_mean)):
        art = (q.entry.rep or {}).get("artifact_dir")
        src = Path(str(art)) / "samples.png" if art else None
        if src is None or not src.is_file():
            sec.notes.append(f"{q.entry.label}: no samples.png in its artifact directory.")
            continue
        name = f"samples_pareto_{i + 1}.png"
        shutil.copyfile(src, ctx.work / name)
        sec.figures.append(Figure(name, f"{q.entry.label} ({ctx.where(q.entry)}): val {q.entry.val_mean:.3f} bpd, "
                                        f"KID {q.kid_mean:.3g}"))


def plot_pareto(points: list[QualityPoint], path) -> Path:
    from .figures import _plt, _save, baseline_style

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    for q in points:
        x, y = q.entry.val_mean, q.kid_mean
        if q.entry.baseline:
            color, marker, _ = baseline_style(q.entry.baseline)
            ax.scatter([x], [y], marker="s", facecolors="none", edgecolors=color, s=60, zorder=3)
            ax.annotate(q.entry.label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8, color=color)
        else:
            ax.scatter([x], [y], color="#1f77b4", alpha=1.0 if q.pareto else 0.35, s=30 if q.pareto else 18, zorder=2)
        if math.isfinite(q.kid_se):
            ax.errorbar([x], [y], yerr=[q.kid_se], color="#999999", lw=0.8, zorder=1)
    front = sorted((q for q in points if q.pareto), key=lambda q: q.entry.val_mean)
    ax.plot([q.entry.val_mean for q in front], [q.kid_mean for q in front], color="#1f77b4", lw=1, ls="--")
    ax.set_xlabel("validation BPD (mean over seeds)")
    ax.set_ylabel("KID (mean over seeds)")
    ax.grid(alpha=0.3)
    return _save(fig, path)


__all__ = ["QualityPoint", "dominates", "kid_verdict", "plot_pareto", "quality_points", "quality_section"]
