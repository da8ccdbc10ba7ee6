"""Noise-rate schedules beta(t) and their integrals B(t) = int_0^t beta(s) ds (float64)."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = [
    "Schedule",
    "LinearSchedule",
    "ConstantSchedule",
    "SCHEDULES",
    "register_schedule",
    "make_schedule",
]

SCHEDULES: dict[str, Callable[..., "Schedule"]] = {}


def register_schedule(name: str):
    def deco(cls):
        SCHEDULES[name] = cls
        return cls

    return deco


class Schedule(ABC):
    """beta(t) >= 0 on [0, T]; methods take and return float64 tensors."""

    name: str = "base"

    @abstractmethod
    def beta(self, t: torch.Tensor) -> torch.Tensor:
        """beta(t)."""

    @abstractmethod
    def integral(self, t: torch.Tensor) -> torch.Tensor:
        """B(t) = int_0^t beta(s) ds."""

    @abstractmethod
    def inverse_integral(self, b: torch.Tensor) -> torch.Tensor:
        """t such that B(t) = b (used for inverse-CDF time sampling)."""

    @abstractmethod
    def to_dict(self) -> dict:
        """JSON description (hashed into the structure)."""


@register_schedule("linear")
@dataclass(frozen=True)
class LinearSchedule(Schedule):
    """beta(t) = beta_0 + (beta_1 - beta_0) t (math note section 1)."""

    beta_0: float = 0.1
    beta_1: float = 10.0
    name: str = "linear"

    def __post_init__(self):
        if not (self.beta_0 >= 0 and self.beta_1 >= 0 and self.beta_0 + self.beta_1 > 0):
            raise ValueError(f"linear schedule needs beta_0, beta_1 >= 0 (got {self.beta_0}, {self.beta_1})")

    def beta(self, t):
        return self.beta_0 + (self.beta_1 - self.beta_0) * t

    def integral(self, t):
        return self.beta_0 * t + 0.5 * (self.beta_1 - self.beta_0) * t * t

    def inverse_integral(self, b):
        a = 0.5 * (self.beta_1 - self.beta_0)
        if abs(a) < 1e-12:
            return b / self.beta_0
        # a t^2 + beta_0 t - b = 0, positive root written stably
        return 2.0 * b / (self.beta_0 + torch.sqrt(self.beta_0**2 + 4.0 * a * b))

    def to_dict(self):
        return {"name": self.name, "beta_0": self.beta_0, "beta_1": self.beta_1}


@register_schedule("constant")
@dataclass(frozen=True)
class ConstantSchedule(Schedule):
    """beta(t) = beta."""

    beta_value: float = 4.0
    name: str = "constant"

    def __post_init__(self):
        if not self.beta_value > 0 or not math.isfinite(self.beta_value):
            raise ValueError(f"constant schedule needs beta > 0 (got {self.beta_value})")

    def beta(self, t):
        return torch.full_like(t, self.beta_value)

    def integral(self, t):
        return self.beta_value * t

    def inverse_integral(self, b):
        return b / self.beta_value

    def to_dict(self):
        return {"name": self.name, "beta": self.beta_value}


def make_schedule(name: str = "linear", **kwargs) -> Schedule:
    """Build a schedule from the registry: ``make_schedule("linear", beta_0=0.1, beta_1=10)``."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; available: {sorted(SCHEDULES)}")
    if name == "constant" and "beta" in kwargs:
        kwargs["beta_value"] = kwargs.pop("beta")
    return SCHEDULES[name](**kwargs)
