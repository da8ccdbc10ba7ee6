"""A run's random generators, one per named stream, from ``train.seed`` / ``train.seeds``.

``train.streams: crn`` (the default): every kind of draw has its own generator, seeded from the
seed of its stream (``train.seeds.<stream>``, else ``train.seed``) and the draw's name
(:func:`~mdmsearch.nets.named_seed`), so that

    stream     generator   draws                                          shape per step
    data       data        batch indices (host)                           [batch]
    data       deq         dequantization of the batch's pixels           [batch, *shape]
    diffusion  time        the uniforms u behind t = F^{-1}(u)            [batch]
    diffusion  noise       eps of the data coordinate                     [batch, 1, *shape]
    diffusion  aux         eps of the K auxiliary coordinates             [batch, K, *shape]
    init       (torch's global stream, the network's layers by name, a learned process's initial noise)

and no generator's draws depend on K except ``aux``'s: two configurations trained with the same
seed see the same batches, the same u (the same t when their time samplers agree) and the same
noise on the data coordinate (common random numbers); pairing their results by seed removes
what they share.  Changing one stream's seed changes its draws only.

``train.streams: shared`` (earlier versions): ``data`` from ``seed + 1`` and one device generator
``noise`` from ``seed + 2`` for dequantization, t and eps of all n = K + 1 coordinates, in that
order (the eps of a K = 3 process take 4x the draws of K = 0, so every later draw differs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..config import TrainConfig
from ..nets import named_seed

__all__ = ["Streams", "DEVICE_GENERATORS", "generator_seed", "make_streams"]

# generator -> (stream, name of its draws) under crn
_CRN = {"data": ("data", "batches"), "deq": ("data", "dequantization"), "time": ("diffusion", "time"),
        "noise": ("diffusion", "noise/data"), "aux": ("diffusion", "noise/aux")}
# generator -> offset from train.seed under shared (the others do not exist there)
_SHARED = {"data": 1, "noise": 2}
# the generators on the run's device, as the trainer names them (f"{name}_gen"), in checkpoint order
DEVICE_GENERATORS = ("noise", "deq", "time", "aux")


def generator_seed(tc: TrainConfig, name: str) -> Optional[int]:
    """The seed generator ``name`` starts from, or None where the run has no such generator."""
    if tc.streams == "shared":
        return tc.seed + _SHARED[name] if name in _SHARED else None
    stream, draws = _CRN[name]
    return named_seed(tc.stream_seed(stream), draws)


@dataclass
class Streams:
    """A run's generators before its first step (None: not a generator of this run's streams)."""

    data: torch.Generator  # host
    noise: torch.Generator  # device
    deq: Optional[torch.Generator]
    time: Optional[torch.Generator]
    aux: Optional[torch.Generator]


def make_streams(tc: TrainConfig, device: torch.device) -> Streams:
    """The generators of ``tc``'s streams: ``data`` on the host, the others on ``device``."""
    def gen(name: str, on: torch.device) -> Optional[torch.Generator]:
        seed = generator_seed(tc, name)
        return None if seed is None else torch.Generator(device=on).manual_seed(seed)

    host = torch.device("cpu")
    return Streams(data=gen("data", host), noise=gen("noise", device), deq=gen("deq", device),
                   time=gen("time", device), aux=gen("aux", device))
