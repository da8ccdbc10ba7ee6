"""Random draws for one share of a batch: the same numbers whatever the number of processes.

A data-parallel run splits every batch between its processes.  For it to be the same run as
one process (same dequantization, times and noise for every example), each process draws the
random numbers of the *whole* batch from its generator (identical on every process) and keeps
its own rows: :class:`BatchShard` stands in for the generator, and :func:`rand` / :func:`randn`
draw from either.  Drawing the whole batch costs each process the draws of the other shares
(a few microseconds per batch: the network dominates); with a plain generator (one process)
they are ``torch.rand`` / ``torch.randn`` unchanged, so one process draws what it always drew.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

__all__ = ["BatchShard", "Generator", "rand", "randn", "shard_rows", "sharded"]


@dataclass(frozen=True)
class BatchShard:
    """Rows ``rows`` of a batch of ``total`` examples whose draws come from ``generator``."""

    generator: torch.Generator
    rows: slice  # this process's rows, start:stop
    total: int  # rows in the whole batch

    @property
    def size(self) -> int:
        return self.rows.stop - self.rows.start


Generator = Union[torch.Generator, BatchShard, None]


def shard_rows(total: int, rank: int, world: int) -> slice:
    """The contiguous rows of ``total`` that process ``rank`` of ``world`` takes (the first
    ``total % world`` processes one more; as ``torch.tensor_split``)."""
    base, extra = divmod(total, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def _draw(fn: Callable, shape: Union[int, Sequence[int]], generator: Generator, **kwargs) -> torch.Tensor:
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if not isinstance(generator, BatchShard):
        return fn(shape, generator=generator, **kwargs)
    if shape[0] != generator.size:
        raise ValueError(f"a draw of {shape[0]} rows from a shard of {generator.size} rows")
    full = fn((generator.total, *shape[1:]), generator=generator.generator, **kwargs)  # [total, *shape[1:]]
    return full[generator.rows]


def rand(shape: Union[int, Sequence[int]], generator: Generator = None, **kwargs) -> torch.Tensor:
    """``torch.rand(shape, generator=...)``; with a :class:`BatchShard`, its rows of the whole batch's draw."""
    return _draw(torch.rand, shape, generator, **kwargs)


def randn(shape: Union[int, Sequence[int]], generator: Generator = None, **kwargs) -> torch.Tensor:
    """``torch.randn(shape, generator=...)``; with a :class:`BatchShard`, its rows of the whole batch's draw."""
    return _draw(torch.randn, shape, generator, **kwargs)


def sharded(generator: Optional[torch.Generator], rows: slice, total: int) -> Generator:
    """``generator`` for rows ``rows`` of a batch of ``total``: itself when the rows are the whole batch."""
    if generator is None or (rows.start == 0 and rows.stop == total):
        return generator
    return BatchShard(generator, rows, total)
