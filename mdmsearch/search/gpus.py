"""GPUs in a search: what a Ray trial asks for, and which GPUs a local worker sees.

``budget.device`` says where a trial trains (``auto``: a GPU when the trial sees one); Ray shows
a trial only the GPUs it asked for (``resources.gpu``; with none, ``CUDA_VISIBLE_DEVICES`` is
empty and ``auto`` trains on the CPU).  So, unless the spec sets ``resources.gpu`` itself:

* ``budget.device`` cuda (any ``cuda...``), or ``auto`` on a cluster with GPUs: each trial asks
  for ``budget.devices`` GPUs (one per process);
* ``cpu``, or ``auto`` on a cluster without GPUs: no GPU, a CPU per process.

A fraction (``resources.gpu: 0.25``) lets several small one-process trials share a card (Ray
packs four on it); a data-parallel trial needs a whole GPU per process.  GPUs asked for where
there are none (or a ``cuda`` device with ``gpu: 0``, which Ray would hide) are one line before
anything runs.

Local workers (``--workers N``) are processes of this machine: worker i sees the GPUs
``(i * devices + j) mod G`` (j < ``budget.devices``) of the G visible ones through its own
``CUDA_VISIBLE_DEVICES``, so N workers spread over the GPUs instead of all using cuda:0, and a
trial's configuration still says ``cuda`` / ``auto`` (a checkpoint resumes on any worker).
"""

from __future__ import annotations

import os
from typing import Optional

from ..errors import MDMError
from .spec import SearchSpec

__all__ = ["VISIBLE_ENV", "asks_for_gpus", "trial_resources", "visible_gpus", "worker_gpus", "check_local_gpus"]

VISIBLE_ENV = "CUDA_VISIBLE_DEVICES"


def _named_cuda(device: str) -> bool:
    return device == "cuda" or device.startswith("cuda:")


def asks_for_gpus(device: str, gpus_there: float) -> bool:
    """Whether trials of ``budget.device`` train on GPUs where ``gpus_there`` GPUs are available."""
    return _named_cuda(device) or (device == "auto" and gpus_there > 0)


def trial_resources(spec: SearchSpec, cluster_gpus: float = 0.0) -> dict[str, float]:
    """What one Tune trial holds on a cluster with ``cluster_gpus`` GPUs: the spec's ``resources``,
    with ``gpu`` from ``budget.device`` when the spec does not set it (see the module), covering
    its ``budget.devices`` processes (a GPU each when the trial uses GPUs, else a CPU each)."""
    devices, device = spec.budget.devices, spec.budget.device
    resources = {"cpu": 1.0, **spec.resources}
    if "gpu" not in spec.resources:
        resources["gpu"] = float(devices) if asks_for_gpus(device, cluster_gpus) else 0.0
    gpu = resources["gpu"]
    if gpu and devices > 1 and gpu < devices:
        raise MDMError(f"budget.devices {devices}: each process needs a GPU, but resources ask for "
                       f"{gpu:g} per trial; set resources.gpu to {devices}")
    if gpu and cluster_gpus < gpu:
        raise MDMError(f"resources.gpu {gpu:g} per trial, but the Ray cluster has {cluster_gpus:g} GPU(s); "
                       "set resources.gpu: 0 and budget.device: cpu (or auto), or join a cluster with GPUs")
    if not gpu and _named_cuda(device):
        raise MDMError(f"budget.device {device} with resources.gpu 0: Ray hides the GPUs from such a trial; "
                       f"set resources.gpu (e.g. {devices}, or 0.25 to share a GPU between small trials)")
    if not gpu:
        resources["cpu"] = max(resources["cpu"], devices)
    return resources


def visible_gpus() -> list[str]:
    """The GPUs this process may hand to workers, as ``CUDA_VISIBLE_DEVICES`` names them (its own
    mask, else 0..count-1); empty without CUDA.  (Counting does not initialize CUDA.)"""
    import torch  # lazy: torch costs ~2 s, and Ray's driver imports this module without training

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    mask = os.environ.get(VISIBLE_ENV)
    if mask is not None:
        return [g.strip() for g in mask.split(",") if g.strip()][:count]
    return [str(i) for i in range(count)]


def worker_gpus(spec: SearchSpec, worker: int, visible: list[str]) -> Optional[str]:
    """The ``CUDA_VISIBLE_DEVICES`` of local worker ``worker`` (None: leave it as it is): its
    ``budget.devices`` GPUs of ``visible``, round robin, when its trials train on GPUs; a
    device that names one GPU (``cuda:1``) is the spec's choice and stays shared."""
    device, per_trial = spec.budget.device, spec.budget.devices
    if not visible or device not in ("auto", "cuda"):
        return None
    first = worker * per_trial
    return ",".join(visible[(first + j) % len(visible)] for j in range(min(per_trial, len(visible))))


def check_local_gpus(spec: SearchSpec, visible: list[str]) -> None:
    """One line, before any worker starts, when the spec's trials need GPUs this machine lacks."""
    device, per_trial = spec.budget.device, spec.budget.devices
    if not _named_cuda(device):
        return
    if not visible:
        raise MDMError(f"budget.device {device}: this machine has no CUDA GPU visible; use cpu or auto")
    tail = device.split(":", 1)[1] if ":" in device else "0"
    index = int(tail) if tail.isdigit() else 0
    need = max(per_trial, index + 1)
    if len(visible) < need:
        raise MDMError(f"budget.device {device} with budget.devices {per_trial} needs {need} GPU(s), "
                       f"this machine has {len(visible)}")

