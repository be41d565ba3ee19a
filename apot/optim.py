"""How a trial's parameters move: SGD with momentum over one or two parameter groups, and the per-epoch
learning-rate schedule (``TrainConfig.schedule``) that scales every group alike."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from apot.recipe import TrainConfig

__all__ = ["make_optimizer", "make_scheduler"]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    """SGD with momentum: group 0 the weights (and BN's scale and shift) at ``lr`` / ``weight_decay``; with
    ``cfg.alpha_lr`` set, group 1 every clipping threshold (``*_alpha``) at ``alpha_lr`` /
    ``alpha_weight_decay`` (``weight_decay`` when None). Without it, one group holds everything."""
    params = list(model.named_parameters())
    alphas = [p for n, p in params if n.endswith("_alpha")] if cfg.alpha_group else []
    ids = {id(p) for p in alphas}
    groups: list[dict[str, Any]] = [{"params": [p for _, p in params if id(p) not in ids]}]
    if alphas:
        wd = cfg.weight_decay if cfg.alpha_weight_decay is None else cfg.alpha_weight_decay
        groups.append({"params": alphas, "lr": cfg.alpha_lr, "weight_decay": wd})
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def make_scheduler(
    opt: torch.optim.Optimizer, schedule: str, epochs: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch LR multiplier for the three schedules (`apot.recipe.SCHEDULES`, see ``TrainConfig``); the
    loop steps it once per epoch."""
    if schedule == "cosine":
        factor = lambda e: 0.5 * (1.0 + math.cos(math.pi * e / epochs))  # noqa: E731
    elif schedule == "step":
        milestones = (max(1, epochs // 2), max(1, (3 * epochs) // 4))  # never before the first epoch ends
        factor = lambda e: 0.1 ** sum(e >= m for m in milestones)  # noqa: E731
    else:
        factor = lambda e: 1.0  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)
