"""Small collectives over the worker group (torch.distributed; no-ops in a single process)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "StopRun",
    "all_gather_object",
    "mean_over_workers",
    "parameter_checksum",
    "stop_if_any",
    "unwrap",
]


class StopRun(Exception):
    """A failure that is not a fault (bad data, divergence, a mismatching resume): every rank
    stops the run together and nothing is retried (``segplatform.train.loop``)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_gather_object(value: Any) -> list[Any]:
    """Every rank's ``value`` (a list of one element outside torch.distributed)."""
    if not is_distributed():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def mean_over_workers(values: list[float], device: torch.device) -> list[float]:
    """The mean of each value over the workers (every rank gets the same numbers)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if is_distributed():
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return [float(v) for v in tensor.cpu()]


def parameter_checksum(model: nn.Module) -> float:
    """Sum of all parameters in float64: equal on every rank iff the replicas agree."""
    with torch.no_grad():
        total = sum(p.detach().double().sum() for p in model.parameters())
    return float(total)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model behind DDP."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def stop_if_any(problem: str | None, kind: str, device: torch.device) -> None:
    """Collective: raise ``StopRun`` on every rank when any rank has a ``problem`` (its text)."""
    if any(mean_over_workers([float(problem is not None)], device)):
        problems = [p for p in all_gather_object(problem) if p]
        raise StopRun(kind, problems[0])
