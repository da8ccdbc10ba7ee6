"""Exponential moving average of parameters (network and process), for evaluation."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn


class EMA:
    def __init__(self, params: list[nn.Parameter], decay: float):
        self.params = list(params)
        self.decay = float(decay)
        self.shadow = [p.detach().clone() for p in self.params]
        # one multi-tensor update per dtype (network float32, process float64)
        self._groups: dict[torch.dtype, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for s, p in zip(self.shadow, self.params):
            shadows, live = self._groups.setdefault(p.dtype, ([], []))
            shadows.append(s)
            live.append(p)  # read under no_grad in update()

    @torch.no_grad()
    def update(self, step: int | None = None) -> None:
        """shadow <- d shadow + (1 - d) param, with d warmed up as min(decay, (1+step)/(10+step))
        so that short runs are not evaluated on their initialization."""
        decay = self.decay if step is None else min(self.decay, (1.0 + step) / (10.0 + step))
        update = get_ema_multi_avg_fn(decay)
        for shadows, live in self._groups.values():
            update(shadows, live, None)

    @contextmanager
    def applied(self, only: list[nn.Parameter] | None = None):
        """Temporarily swap the EMA values into the live parameters (``only``: into these of
        them, e.g. the process's few, without copying the network)."""
        keep = None if only is None else {id(p) for p in only}
        pairs = [(p, s) for p, s in zip(self.params, self.shadow) if keep is None or id(p) in keep]
        backup = [p.detach().clone() for p, _ in pairs]
        with torch.no_grad():
            for p, s in pairs:
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for (p, _), b in zip(pairs, backup):
                    p.copy_(b)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": [s.clone() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        for s, v in zip(self.shadow, state["shadow"]):
            s.copy_(v)
