"""Figures people look at: learned Q/D heatmaps with eigenvalues, learning curves."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _labels(n: int) -> list[str]:
    return ["x"] + [f"v{i}" for i in range(1, n)]


def plot_qd(q: Sequence, d: Sequence, path: str | Path, title: str = "") -> Path:
    """Annotated heatmaps of Q and D side by side on one colour scale, with eigenvalues of
    A = -(Q + D) (S_inf = I) and of D in the panel titles."""
    plt = _plt()
    q, d = np.asarray(q, dtype=float), np.asarray(d, dtype=float)
    n = q.shape[0]
    fig, axes = plt.subplots(1, 2, figsize=(2.2 * n + 3, 1.6 * n + 1.6))
    eig_a = np.linalg.eigvals(-(q + d))
    eig_d = np.linalg.eigvalsh(d)
    # one colour scale for both panels, so that Q and D entries compare by colour (and an all-zero
    # matrix, e.g. VPSDE's Q, gets a readable scale rather than one of +-1e-12)
    lim = float(max(np.abs(q).max(), np.abs(d).max())) or 1.0
    for ax, mat, name, eigs in ((axes[0], q, "Q", eig_a), (axes[1], d, "D", eig_d)):
        im = ax.imshow(mat, cmap="RdBu_r", vmin=-lim, vmax=lim)
        for i in range(n):
            for j in range(n):
                dark = abs(mat[i, j]) > 0.6 * lim  # light text on the saturated ends of the map
                ax.text(j, i, f"{mat[i, j]:.2f}", ha="center", va="center", fontsize=9,
                        color="white" if dark else "black")
        ax.set_xticks(range(n), _labels(n))
        ax.set_yticks(range(n), _labels(n))
        what = "eig(A)" if name == "Q" else "eig(D)"
        eig_txt = ", ".join(f"{complex(e).real:.2f}" + (f"{complex(e).imag:+.2f}i" if abs(complex(e).imag) > 1e-9 else "") for e in eigs)
        ax.set_title(f"{name}\n{what}: {eig_txt}", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_learning_curves(curves: dict[str, tuple[Sequence[float], Sequence[float]]], path: str | Path,
                         ylabel: str = "validation BPD", title: str = "") -> Path:
    """curves: label -> (steps, values)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (xs, ys) in curves.items():
        ax.plot(list(xs), list(ys), marker="o", ms=3, label=label)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if curves:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
