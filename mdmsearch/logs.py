"""Logging for the command line and its worker processes: timestamps, -q/-v levels, an
optional log file, and dependency warnings kept out of the user's way."""

from __future__ import annotations

import logging
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from .errors import ConfigError

FORMAT = "%(asctime)s %(levelname)s{tag} %(name)s: %(message)s"
DATEFMT = "%Y-%m-%d %H:%M:%S"

# Warnings that dependencies raise on every run and that the user can do nothing about.
_DEPENDENCY_WARNINGS = (  # optuna.exceptions.ExperimentalWarning, matched by text (no optuna import here)
    r".*is experimental \(supported from",
    r".*is an experimental feature",
)


def filter_dependency_warnings() -> None:
    for pattern in _DEPENDENCY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def setup_logging(verbose: bool = False, quiet: bool = False, log_file: Optional[str] = None,
                  tag: str = "") -> None:
    """Root logging to stderr (INFO; DEBUG with -v; WARNING with -q) and, with ``log_file``,
    the same lines appended to that file.  Python warnings go through logging too."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        path = Path(log_file)
        if path.is_dir() or not path.parent.is_dir():
            raise ConfigError(f"--log-file {log_file}: "
                              + ("is a directory" if path.is_dir() else f"no such directory {path.parent}"))
        try:
            handlers.append(logging.FileHandler(path))
        except OSError as exc:
            raise ConfigError(f"--log-file {log_file}: cannot open: {exc.strerror or exc}") from None
    logging.basicConfig(level=level, format=FORMAT.format(tag=f" {tag}" if tag else ""), datefmt=DATEFMT,
                        handlers=handlers, force=True)
    if not verbose:
        filter_dependency_warnings()
    logging.captureWarnings(True)


def options(args) -> dict:
    """The logging options of parsed CLI args, to hand to worker processes."""
    return {"verbose": bool(getattr(args, "verbose", False)), "quiet": bool(getattr(args, "quiet", False)),
            "log_file": getattr(args, "log_file", None)}


@contextmanager
def quieter(name: str, level: int = logging.WARNING) -> Iterator[None]:
    """Logger ``name`` says only ``level`` and above inside the block (a check before anything is
    created loads data, and an error it then raises must stay the only line)."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(max(level, logger.getEffectiveLevel()))
    try:
        yield
    finally:
        logger.setLevel(before)


def route_optuna() -> None:
    """Optuna's messages through our handlers (timestamps, -q, --log-file), not its own."""
    import optuna

    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    optuna.logging.set_verbosity(max(logging.getLogger().level, logging.INFO))  # -q silences its INFO lines
