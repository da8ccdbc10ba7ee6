"""Report figures (matplotlib, Agg backend).  Every function writes one PNG and returns its path;
the caller decides what to plot (selection lives in :mod:`mdmsearch.report.build`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

DPI = 110
MAX_NUMERIC_CATEGORIES = 6  # numeric parameters with at most this many values get one tick per value
BASELINE_STYLE = {  # color, marker, line style: the same in every figure
    "vpsde": ("#222222", "D", "--"),
    "cld": ("#d62728", "s", ":"),
    "alda": ("#9467bd", "^", "-."),
    "malda": ("#8c564b", "v", (0, (5, 2, 1, 2))),
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    plt = _plt()
    path = Path(path)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def baseline_style(name: str):
    return BASELINE_STYLE.get(str(name).lower(), ("#7f7f7f", "P", "--"))


def _study_colors(studies: Sequence[str]) -> dict[str, str]:
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#17becf", "#e377c2", "#bcbd22", "#7f7f7f", "#aec7e8"]
    return {s: palette[i % len(palette)] for i, s in enumerate(studies)}


def _maybe_log(ax, values: Sequence[float]) -> None:
    v = [float(x) for x in values if x is not None and math.isfinite(float(x)) and float(x) > 0]
    if v and max(v) / min(v) > 4:
        ax.set_yscale("log")
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())


def _time_unit(seconds: float) -> tuple[float, str]:
    if seconds >= 2 * 3600:
        return 3600.0, "h"
    if seconds >= 120:
        return 60.0, "min"
    return 1.0, "s"


# ---------------------------------------------------------------------- anytime
def plot_anytime(runs, path: str | Path) -> Path:
    """Best-so-far validation BPD against trial number (left) and elapsed wall time (right), one
    colour per study; dots are completed trials, outlined markers the baselines.

    ``runs``: the frame from :func:`mdmsearch.report.data.anytime`."""
    plt = _plt()
    studies = sorted(runs["study"].unique())
    colors = _study_colors(studies)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.9), sharey=True)
    tmax = float(runs["elapsed"].max()) if runs["elapsed"].notna().any() else 1.0
    scale, unit = _time_unit(tmax)
    ok_all = runs[(runs["state"] == "COMPLETE") & runs["val_bpd"].notna()]
    for study in studies:
        part = runs[runs["study"] == study]
        ok = part[(part["state"] == "COMPLETE") & part["val_bpd"].notna()]
        c = colors[study]
        for ax, xcol, bestcol in ((axes[0], "trial", "best_by_trial"), (axes[1], "elapsed", "best_by_time")):
            seq = part.sort_values(xcol if xcol == "trial" else "elapsed")
            x = seq[xcol].astype(float) / (scale if xcol == "elapsed" else 1.0)
            ax.step(x, seq[bestcol], where="post", color=c, lw=2, label=f"{study} best so far")
            learned = ok[ok["is_baseline"] == False]  # noqa: E712 (pandas mask)
            ax.scatter(learned[xcol].astype(float) / (scale if xcol == "elapsed" else 1.0), learned["val_bpd"],
                       s=16, color=c, alpha=0.45, lw=0, label=f"{study} completed trial")
            for _, r in ok[ok["is_baseline"] == True].iterrows():  # noqa: E712
                col, mk, _ = baseline_style(r["baseline"])
                ax.scatter([float(r[xcol]) / (scale if xcol == "elapsed" else 1.0)], [r["val_bpd"]], s=42,
                           marker=mk, facecolor="white", edgecolor=col, lw=1.5, zorder=5)
    if len(ok_all):
        _maybe_log(axes[0], ok_all["val_bpd"])
    axes[0].set_xlabel("trial number")
    axes[1].set_xlabel(f"wall time since the study started ({unit})")
    axes[0].set_ylabel("validation BPD (completed trials)")
    axes[0].set_title("best so far vs trial", fontsize=10)
    axes[1].set_title("anytime: best so far vs wall time", fontsize=10)
    for ax in axes:
        ax.grid(alpha=0.3)
    # one legend: studies + baseline markers actually present
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colors[s], lw=2, marker="o", ms=4, label=s) for s in studies]
    for b in sorted(ok_all.loc[ok_all["is_baseline"] == True, "baseline"].unique()):  # noqa: E712
        col, mk, _ = baseline_style(b)
        handles.append(Line2D([], [], ls="", marker=mk, markerfacecolor="white", markeredgecolor=col,
                              label=f"{str(b).upper()} (baseline)"))
    axes[1].legend(handles=handles, fontsize=8, loc="upper right", framealpha=0.9)
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------------- structure effects
def plot_by_structure(learned, baselines: dict[str, float], path: str | Path) -> Path:
    """Validation BPD of completed learned trials by number of auxiliary variables K, by Q
    pattern and by D pattern (box + jittered points); best baselines as horizontal lines."""
    plt = _plt()
    panels = [("n_aux", "number of auxiliary variables K"), ("q_pattern", "Q sparsity pattern"),
              ("d_pattern", "D sparsity pattern")]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.9), sharey=True,
                             gridspec_kw={"width_ratios": [max(2, learned[c].nunique()) for c, _ in panels]})
    rng = np.random.default_rng(0)
    for ax, (col, title) in zip(axes, panels):
        cats = sorted(learned[col].dropna().unique(), key=lambda v: (isinstance(v, str), v))
        data = [learned.loc[learned[col] == c, "val_bpd"].astype(float).to_numpy() for c in cats]
        if cats:
            ax.boxplot(data, positions=range(len(cats)), widths=0.5, showfliers=False,
                       medianprops={"color": "#1f77b4", "lw": 2}, boxprops={"color": "#555555"},
                       whiskerprops={"color": "#555555"}, capprops={"color": "#555555"})
            for i, ys in enumerate(data):
                ax.scatter(i + rng.uniform(-0.14, 0.14, len(ys)), ys, s=16, color="#1f77b4", alpha=0.6, lw=0,
                           zorder=3)
            labels = [f"{int(c) if col == 'n_aux' else c}\n(n={len(d)})" for c, d in zip(cats, data)]
            ax.set_xticks(range(len(cats)), labels, fontsize=8)
            ax.set_xlim(-0.6, len(cats) - 0.4)
        for name, val in baselines.items():
            colr, _, ls = baseline_style(name)
            ax.axhline(val, color=colr, ls=ls, lw=1.2, label=f"{name.upper()} {val:.3f}")
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    allv = list(learned["val_bpd"].astype(float)) + list(baselines.values())
    _maybe_log(axes[0], allv)
    axes[0].set_ylabel("validation BPD (completed)")
    fig.tight_layout()
    if baselines:
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(labels), fontsize=8,
                   frameon=False, title="baselines (validation BPD, mean over seeds)", title_fontsize=8)
    return _save(fig, path)


# ---------------------------------------------------------------------- importances
def plot_importances(importances: dict[str, dict[str, float]], path: str | Path,
                     n_trials: Optional[dict[str, int]] = None) -> Path:
    """Horizontal bars of Optuna parameter importances, one panel per study (``n_trials``: the
    completed trials behind each, shown in the panel title)."""
    plt = _plt()
    studies = list(importances)
    rows = max(len(v) for v in importances.values())
    fig, axes = plt.subplots(1, len(studies), figsize=(4.6 * len(studies) + 0.6, 0.42 * rows + 1.3), squeeze=False)
    for ax, study in zip(axes[0], studies):
        items = sorted(importances[study].items(), key=lambda kv: kv[1])
        names, vals = [k for k, _ in items], [v for _, v in items]
        ax.barh(range(len(vals)), vals, color="#1f77b4")
        ax.set_yticks(range(len(vals)), names, fontsize=8)
        for i, v in enumerate(vals):
            ax.text(v + 0.01, i, f"{v:.2f}", va="center", fontsize=8)
        ax.set_xlim(0, max(1e-9, max(vals)) * 1.25)
        n = (n_trials or {}).get(study)
        ax.set_title(f"study {study}" + (f" ({n} completed trials)" if n is not None else ""), fontsize=10)
        ax.set_xlabel("importance (normalized)")
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------------- parallel coordinates
def plot_parallel(table, axes_cols: Sequence[str], path: str | Path, value: str = "val_bpd") -> Path:
    """Parallel coordinates of completed trials: one vertical axis per parameter (categorical
    values evenly spaced, numbers linear or log), the last axis the BPD; lines coloured by BPD
    (darker = lower = better)."""
    plt = _plt()
    import matplotlib as mpl

    cols = list(axes_cols) + [value]
    n = len(cols)
    fig, ax = plt.subplots(figsize=(max(7.5, 1.9 * n), 4.2))
    pos = {}  # col -> (normalized values, tick positions, tick labels)
    for col in cols:
        raw = table[col]
        numeric = all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
                      for v in raw.dropna())
        if numeric and (col == value or raw.nunique() > MAX_NUMERIC_CATEGORIES):
            v = raw.astype(float).to_numpy()
            use_log = col != value and np.nanmin(v) > 0 and np.nanmax(v) / np.nanmin(v) >= 10
            t = np.log10(v) if use_log else v
            lo, hi = np.nanmin(t), np.nanmax(t)
            norm = (t - lo) / (hi - lo) if hi > lo else np.full_like(t, 0.5)
            ticks = np.linspace(0, 1, 5)
            tick_vals = lo + ticks * (hi - lo)
            labels = [f"{10 ** x:.3g}" if use_log else f"{x:.3g}" for x in tick_vals]
            pos[col] = (norm, ticks, labels)
        else:
            cats = sorted(raw.dropna().unique(), key=lambda c: (isinstance(c, str), c))
            if len(cats) == 1:
                idx = {cats[0]: 0.5}
            else:
                idx = {c: i / (len(cats) - 1) for i, c in enumerate(cats)}
            norm = np.array([idx.get(c, np.nan) for c in raw], dtype=float)
            labels = [f"{c:g}" if isinstance(c, (int, float, np.integer, np.floating)) and not isinstance(c, bool)
                      else str(c) for c in cats]
            pos[col] = (norm, [idx[c] for c in cats], labels)
    vals = table[value].astype(float).to_numpy()
    cmap = mpl.colormaps["viridis"]
    cnorm = mpl.colors.Normalize(vmin=np.nanmin(vals), vmax=np.nanmax(vals) if np.nanmax(vals) > np.nanmin(vals)
                                 else np.nanmin(vals) + 1e-9)
    order = np.argsort(-vals)  # best drawn last, on top
    for i in order:
        ys = [pos[c][0][i] for c in cols]
        ax.plot(range(n), ys, color=cmap(cnorm(vals[i])), alpha=0.8, lw=1.6)
    for j, col in enumerate(cols):
        ax.axvline(j, color="#444444", lw=1)
        _, ticks, labels = pos[col]
        for t, lab in zip(ticks, labels):
            ax.text(j + 0.04, t, lab, fontsize=7.5, va="center", ha="left",
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8})
    ax.set_xticks(range(n), [("validation BPD" if c == value else c) for c in cols], fontsize=9)
    ax.set_yticks([])
    ax.set_xlim(-0.2, n - 0.5)
    ax.set_ylim(-0.06, 1.06)
    for s in ("left", "right", "top"):
        ax.spines[s].set_visible(False)
    sm = mpl.cm.ScalarMappable(norm=cnorm, cmap=cmap)
    fig.colorbar(sm, ax=ax, fraction=0.03, pad=0.01, label="validation BPD")
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------------- learning curves
def plot_curves(top: Sequence[tuple[str, Sequence[float], Sequence[float]]], baseline: Optional[tuple],
                pruned: Sequence[tuple[Sequence[float], Sequence[float]]], path: str | Path,
                baseline_name: str = "") -> Path:
    """Validation BPD against training step: the top trials (coloured), the best baseline
    (dashed) and the pruned trials (thin grey, a cross where the pruner stopped them)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    focus = []
    for i, (xs, ys) in enumerate(pruned):
        ax.plot(xs, ys, color="#9a9a9a", lw=0.9, alpha=0.6, zorder=1,
                label=f"pruned trials ({len(pruned)})" if i == 0 else None)
        if len(xs):
            ax.scatter([xs[-1]], [ys[-1]], marker="x", s=18, color="#7a7a7a", zorder=2)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, xs, ys) in enumerate(top):
        ax.plot(xs, ys, marker="o", ms=3.5, lw=1.8, color=colors[i % len(colors)], label=label, zorder=4)
        focus += list(ys)
    if baseline is not None:
        label, xs, ys = baseline
        col, mk, ls = baseline_style(baseline_name)
        ax.plot(xs, ys, ls=ls, marker=mk, ms=3.5, lw=1.6, color=col, label=label, zorder=3)
        focus += list(ys)
    focus += [v for _, ys in pruned for v in ys]
    focus = [float(v) for v in focus if v is not None and math.isfinite(float(v))]
    if focus:
        lo, hi = min(focus), max(focus)
        _maybe_log(ax, focus)
        if ax.get_yscale() == "log":
            ax.set_ylim(lo / 1.08, hi * 1.08)
        else:
            pad = 0.06 * (hi - lo or abs(hi) or 1.0)
            ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation BPD")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return _save(fig, path)
