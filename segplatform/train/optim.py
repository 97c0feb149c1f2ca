"""Optimisation: parameter groups, the optimizer, and the poly learning-rate schedule.

- ``parameter_groups``: the backbone's parameters (under ``model.backbone``) at ``lr``, the rest
  (heads, decoders) at ``lr × head_lr_mult`` (DeepLab and PSPNet train their new layers 10× faster
  when the backbone is pretrained).
- ``build_optimizer``: SGD with ``momentum``, or AdamW with ``betas``. Each optimizer reads only
  its own settings (``TrainConfig`` refuses the other's), so SGD's momentum never becomes AdamW's
  beta1.
- ``PolyLR``: ``lr × (1 - step / max_iters) ** power`` (DeepLab v2 §4, "poly") times a linear
  warmup ramp from ``warmup_factor × lr`` over ``warmup_iters``; its state is plain numbers, so a
  checkpoint loads with ``weights_only=True``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from segplatform.train.config import TrainConfig

__all__ = ["PolyLR", "build_optimizer", "lr_factor", "parameter_groups"]


def parameter_groups(model: nn.Module, lr: float, head_lr_mult: float) -> list[dict[str, Any]]:
    """Backbone parameters (under ``model.backbone``) at ``lr``, the rest at ``lr × mult``."""
    backbone = getattr(model, "backbone", None)
    backbone_ids = (
        {id(p) for p in backbone.parameters()} if isinstance(backbone, nn.Module) else set()
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if id(p) in backbone_ids], "lr": lr, "name": "backbone"},
        {
            "params": [p for p in trainable if id(p) not in backbone_ids],
            "lr": lr * head_lr_mult,
            "name": "head",
        },
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The configured optimizer over ``parameter_groups``."""
    groups = parameter_groups(model, cfg.lr, cfg.head_lr_mult)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(
            groups, lr=cfg.lr, betas=cfg.resolved_betas(), weight_decay=cfg.weight_decay
        )
    return torch.optim.SGD(
        groups, lr=cfg.lr, momentum=cfg.resolved_momentum(), weight_decay=cfg.weight_decay
    )


def lr_factor(
    step: int, *, max_iters: int, power: float, warmup_iters: int, warmup: float
) -> float:
    """Poly schedule ``(1 - step/max_iters)^power`` times a linear warmup ramp."""
    factor = (1.0 - min(step, max_iters) / max_iters) ** power if power > 0 else 1.0
    if step < warmup_iters:
        factor *= warmup + (1.0 - warmup) * step / warmup_iters
    return factor


class PolyLR(torch.optim.lr_scheduler.LambdaLR):
    """``LambdaLR`` with the poly + warmup factor (a class, so its state is plain numbers)."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        max_iters: int,
        power: float,
        warmup_iters: int,
        warmup: float,
    ) -> None:
        self.max_iters, self.power = max_iters, power
        self.warmup_iters, self.warmup = warmup_iters, warmup
        super().__init__(optimizer, self._factor)

    @classmethod
    def from_config(cls, optimizer: torch.optim.Optimizer, cfg: TrainConfig, max_iters: int):
        return cls(
            optimizer,
            max_iters=max_iters,
            power=cfg.poly_power,
            warmup_iters=cfg.warmup_iters,
            warmup=cfg.warmup_factor,
        )

    def _factor(self, step: int) -> float:
        return lr_factor(
            step,
            max_iters=self.max_iters,
            power=self.power,
            warmup_iters=self.warmup_iters,
            warmup=self.warmup,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "last_epoch": self.last_epoch,
            "base_lrs": list(self.base_lrs),
            "last_lr": list(self.get_last_lr()),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_epoch = int(state_dict["last_epoch"])
        self.base_lrs = [float(v) for v in state_dict["base_lrs"]]
        lrs = [base * self._factor(self.last_epoch) for base in self.base_lrs]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self._last_lr = lrs
