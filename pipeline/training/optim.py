"""Optimizers and learning-rate schedules chosen by name (after torchvision's references):
an unknown name is an error that lists the valid ones."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from pipeline.errors import ConfigError


@dataclass(frozen=True)
class TrainSettings:
    """The optimisation settings a training loop needs (a narrow piece of the config)."""

    epochs: int
    lr: float
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    momentum: float = 0.9
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    patience: int | None = None  # early stopping: validations without a better val accuracy
    validate_every: int = 1  # epochs between validations (the last epoch is always validated)
    class_weights: tuple[float, ...] | None = None  # of the default cross-entropy (data.balance: weights)
    select_metric: str = "accuracy"  # what picks the best epoch and drives early stopping: accuracy | macro_f1

    @classmethod
    def from_adapt(cls, a, budget=None) -> "TrainSettings":
        """From a pipeline.config.AdaptConfig (its fields of the same names), with the length of
        `budget` (pipeline.training.budget.Budget) when given."""
        kw = {f: getattr(a, f) for f in cls.__dataclass_fields__ if hasattr(a, f)}
        if budget is not None:
            kw.update(epochs=budget.epochs, validate_every=budget.validate_every)
        return cls(**kw)


def _adamw(groups, lr, weight_decay, momentum):
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def _sgd(groups, lr, weight_decay, momentum):
    return torch.optim.SGD(groups, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=momentum > 0)


OPTIMIZERS: dict[str, Callable] = {"adamw": _adamw, "sgd": _sgd}


def param_groups(groups: Iterable[tuple[list[nn.Parameter], float]], weight_decay: float) -> list[dict]:
    """Optimizer param groups from (params, lr_scale) pairs. Biases and norm weights (1-D) get no weight decay."""
    out = []
    for params, scale in groups:
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        for ps, wd in ((decay, weight_decay), (no_decay, 0.0)):
            if ps:
                out.append({"params": ps, "lr_scale": scale, "weight_decay": wd})
    return out


def make_optimizer(name: str, groups: list[dict], lr: float, weight_decay: float, momentum: float = 0.9):
    """Build an optimizer by name; each group's lr is lr * its 'lr_scale'."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer '{name}'; valid: {', '.join(OPTIMIZERS)}")
    for g in groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    return OPTIMIZERS[name](groups, lr, weight_decay, momentum)


def cosine_schedule(optimizer, epochs: int, steps_per_epoch: int, warmup_epochs: float = 0.0):
    """Per-step cosine decay to 0 after a linear warm-up of `warmup_epochs`."""
    total = max(1, epochs * steps_per_epoch)
    warm = int(warmup_epochs * steps_per_epoch)

    def f(step):
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, f)
