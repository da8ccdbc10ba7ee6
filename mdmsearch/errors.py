"""Typed errors: each one carries a single readable line for the CLI."""

from __future__ import annotations


class MDMError(Exception):
    """Base class for mdmsearch errors that the CLI reports as one line."""


class InvalidStructureError(MDMError, ValueError):
    """A (Q, D) structure that cannot reach the target noise (math note, section 6)."""


class CholeskyError(MDMError, RuntimeError):
    """The transition covariance is not positive definite for the current Q and D."""


class NonFiniteLossError(MDMError, RuntimeError):
    """Training produced a NaN/inf loss."""


class ConfigError(MDMError, ValueError):
    """Invalid configuration or search-space spec."""
