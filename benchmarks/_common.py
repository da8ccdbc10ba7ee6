"""Shared benchmark plumbing: machine/version record, JSON + Markdown output."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "reports" / "benchmarks"
sys.path.insert(0, str(ROOT))


def machine() -> dict:
    import mdmsearch
    import optuna

    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "mdmsearch": mdmsearch.__version__,
        "optuna": optuna.__version__,
    }


def write(name: str, payload: dict, table_md: str) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "machine": machine(), **payload}
    (OUT / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    md = f"# {name}\n\n{table_md}\n\nMachine: `{json.dumps(payload['machine'])}`\n"
    (OUT / f"{name}.md").write_text(md)
    return OUT / f"{name}.md"


def md_table(rows: list[dict], cols: list[str], fmt: dict | None = None) -> str:
    fmt = fmt or {}
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    lines = []
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(fmt[c].format(v) if c in fmt and isinstance(v, (int, float)) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines)


def _timed(fn) -> float:
    """Seconds one call of ``fn`` takes (synchronizing CUDA before and after)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _median(times: list[float]) -> float:
    return sorted(times)[len(times) // 2]


def timeit(fn, repeats: int, warmup: int = 2) -> float:
    """Median seconds per call (synchronizing CUDA)."""
    for _ in range(warmup):
        fn()
    return _median([_timed(fn) for _ in range(repeats)])


def timeit_pair(fn_a, fn_b, repeats: int, warmup: int = 2) -> tuple[float, float]:
    """Median seconds per call of two functions timed in alternation (a, b, a, b, ...), so that
    a machine whose speed drifts during the measurement affects both the same way."""
    for _ in range(warmup):
        fn_a()
        fn_b()
    pairs = [(_timed(fn_a), _timed(fn_b)) for _ in range(repeats)]
    return _median([a for a, _ in pairs]), _median([b for _, b in pairs])
