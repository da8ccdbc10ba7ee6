"""Typed errors: each one carries a single readable line for the CLI."""

from __future__ import annotations


class MDMError(Exception):
    """Base class for mdmsearch errors that the CLI reports as one line."""


class InvalidStructureError(MDMError, ValueError):
    """A (Q, D) structure that cannot reach the target noise (math note, section 6)."""


class CholeskyError(MDMError, RuntimeError):
    """The transition covariance is not positive definite for the current Q and D.

    Its data are attributes, so that callers never parse the message: ``process`` (name),
    ``t`` (the first failing time, or None), ``Q`` and ``D`` (nested lists)."""

    def __init__(self, message: str, *, process: str = "", t: float | None = None, Q=None, D=None):
        super().__init__(message)
        self.process, self.t, self.Q, self.D = process, t, Q, D

    @property
    def where(self) -> str:
        """'at t=0.0024 for process 'learned'' -- the failure without the matrices."""
        return (f"at t={self.t:.3g} " if self.t is not None else "") + f"for process {self.process!r}"


class NonFiniteLossError(MDMError, RuntimeError):
    """Training produced a NaN/inf loss."""


class ConfigError(MDMError, ValueError):
    """Invalid configuration or search-space spec."""


class ProcessGroupError(MDMError, RuntimeError):
    """A process of a data-parallel run died or failed, or the processes' weights disagree."""


def one_line(exc: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message``, cut to ``limit`` characters (for one-line errors)."""
    lines = [s.strip() for s in str(exc).splitlines() if s.strip()]
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= limit else text[: limit - 3] + "..."
