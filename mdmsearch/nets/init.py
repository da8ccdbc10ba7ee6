"""Initial weights by layer name: the same layer gets the same weights whatever else the network has.

A network built in the ordinary way draws every layer's initial weights, in construction order,
from torch's one global stream.  Two networks that differ in one layer's shape (the score
network's input layer takes n = K + 1 variables, so it changes with the number of auxiliary
variables K) then consume a different number of draws before every later layer, and *all* their
weights differ.  :func:`init_by_name` re-draws each layer's weights from its own stream, seeded
from (seed, the layer's qualified name): a layer whose shape does not depend on K gets bit for
bit the same initial weights in every configuration trained with the same seed (common random
numbers for comparisons between structures), and the distribution of every layer is the one its
``reset_parameters`` draws (torch's default initialization of that layer type).

Layers initialized to zero by their network (the output convolution and the last convolution of
each residual branch of the U-Net, the MLP's output layer: eps_hat starts at 0) stay zero.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

__all__ = ["named_seed", "init_by_name"]


def named_seed(seed: int, name: str) -> int:
    """A 63-bit seed for the stream ``name`` of ``seed``: blake2b of both, so that different names
    (or seeds) never give overlapping streams (``seed + 1`` of one name would be ``seed`` of the next)."""
    digest = hashlib.blake2b(f"{int(seed)}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _own_parameters(module: nn.Module) -> list[nn.Parameter]:
    return list(module.parameters(recurse=False))


@torch.no_grad()
def init_by_name(net: nn.Module, seed: int) -> nn.Module:
    """Re-draw the initial weights of every layer of ``net`` that holds parameters from its own
    stream ``named_seed(seed, "init/<qualified name>")`` with the layer's ``reset_parameters``;
    layers whose parameters are all zero keep them (a zero-initialized layer); torch's global
    stream is left as it was.  A layer with parameters but no ``reset_parameters`` is a
    ValueError (its initialization could not be drawn by name).  Returns ``net``."""
    for name, module in net.named_modules():
        params = _own_parameters(module)
        if not params or all(not p.any() for p in params):
            continue  # no parameters of its own, or zero-initialized
        reset = getattr(module, "reset_parameters", None)
        if not callable(reset):
            raise ValueError(f"layer {name or '<root>'!r} ({type(module).__name__}) has parameters but no "
                             "reset_parameters(): its initial weights cannot be drawn by name")
        with torch.random.fork_rng(devices=[]):  # (the global CPU stream, restored on exit)
            torch.manual_seed(named_seed(seed, f"init/{name}"))
            reset()
    return net
