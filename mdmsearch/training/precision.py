"""Mixed precision for the score network alone (``model.precision``: fp32, bf16, fp16).

Only the network's forward pass runs under ``torch.autocast``: :class:`Autocast` wraps it and
casts its output back to the dtype of its input z (the ELBO's data dtype, float32), so the
process (Q, D, transition kernels: float64), the Gaussian part of the mixed predictor and the
ELBO's arithmetic are exactly what they are in fp32.  The network's parameters, their
gradients, Adam's state and the EMA stay float32 (autocast casts the weights per operation).

fp16 has 5 exponent bits: small gradients underflow to zero, so fp16 training scales the loss
(``torch.amp.GradScaler``: scale, unscale before clipping, step, update; a step whose
gradients overflowed is skipped and the scale halved), and the scaler's state is checkpointed.
bf16 has float32's range and needs no scaler.  Both work on CPU and CUDA (fp16 on CPU is
emulated and slow: for tests and checks, not speed).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..errors import ConfigError

__all__ = ["PRECISIONS", "SCALED", "Autocast", "autocast_network", "make_scaler"]

# model.precision -> the autocast dtype (None: the network runs in float32 as built)
PRECISIONS: dict[str, Optional[torch.dtype]] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# precisions whose gradients need loss scaling
SCALED = frozenset({"fp16"})


class Autocast(nn.Module):
    """``net(z, t)`` under autocast to ``dtype`` on the device of z, its output [B, n, *shape]
    cast back to z's dtype.  Holds no parameters of its own (the network's are the run's)."""

    def __init__(self, net: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.net = net
        self.dtype = dtype

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.autocast(z.device.type, dtype=self.dtype):
            out = self.net(z, t)  # [B, n, *shape], self.dtype
        return out.to(z.dtype)


def _check_device(precision: str, device: torch.device) -> None:
    if PRECISIONS[precision] is not None and not torch.amp.is_autocast_available(device.type):
        raise ConfigError(f"model.precision {precision!r} needs autocast, which torch does not offer on "
                          f"{device.type!r}; use fp32 there (or train on CPU or CUDA)")


def autocast_network(net: nn.Module, precision: str, device: torch.device) -> nn.Module:
    """What the noise predictor calls: ``net`` itself for fp32, else ``net`` under autocast."""
    if precision not in PRECISIONS:
        raise ConfigError(f"model.precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    _check_device(precision, device)
    dtype = PRECISIONS[precision]
    return net if dtype is None else Autocast(net, dtype)


def make_scaler(precision: str, device: torch.device) -> Optional[torch.amp.GradScaler]:
    """The loss scaler fp16 training needs (None for fp32 and bf16)."""
    return torch.amp.GradScaler(device.type) if precision in SCALED else None
