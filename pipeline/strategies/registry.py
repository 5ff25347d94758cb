"""One registry of adapt strategies (after timm's `register_model`): a strategy is
`fn(model, data, cfg, ctx) -> AdaptOutcome`; it trains the pretrained `EdgeClassifier` it is
given and returns a plain `EdgeClassifier` (no extra modules, so export sees an ordinary graph)
with its test logits."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

from pipeline.config import AdaptConfig
from pipeline.errors import ConfigError
from pipeline.models import EdgeClassifier
from pipeline.strategies.data import AdaptData, train_loader
from pipeline.training import FitResult, TrainSettings, class_weights, fit, predict_logits
from pipeline.training.balance import PRIOR_SHIFT_TAU, prior_shift
from pipeline.training.budget import Budget, plan_budget
from runtime.registry import Registry


@dataclass
class AdaptContext:
    """What a strategy needs besides the model, the data and its config."""

    arch: str
    seed: int = 0
    batch_size: int = 64
    num_workers: int = 0
    adapter_dir: Path | None = None  # where the LoRA adapter is saved (None: not saved)
    checkpoint_dir: Path | None = None  # resumable checkpoint (None: none)
    resume: bool = False
    run_config: dict | None = None
    is_main: bool = True
    desc: str = "adapt"
    budget: Budget | None = None  # the training length (with_budget sets it and the batch size)
    balance: str = "none"  # data.balance: none | weights | sampler
    select_metric: str = "accuracy"  # data.select_metric


@dataclass
class AdaptOutcome:
    model: EdgeClassifier  # trained, plain (no adapters), eval mode, on the CPU
    test_logits: torch.Tensor
    val_accuracy: float
    fit: FitResult | None
    trainable_params: int
    extra: dict[str, Any] = field(default_factory=dict)


def with_budget(cfg: AdaptConfig, data: AdaptData, ctx: AdaptContext) -> AdaptContext:
    """`ctx` with the training budget for this data (pipeline.training.budget) and its batch size;
    the budget is logged, so a user sees how long training will be and why."""
    if ctx.budget is not None:
        return ctx
    b = plan_budget(cfg.strategy, len(data.labels("train")), ctx.batch_size, epochs=cfg.epochs, steps=cfg.steps,
                    min_steps=cfg.min_steps)
    log.info("%s: training budget %s", ctx.desc, b.describe())
    return replace(ctx, budget=b, batch_size=b.batch_size)


def loader_for(data: AdaptData, augment: str, ctx: AdaptContext) -> DataLoader:
    return train_loader(data, augment, ctx.batch_size, ctx.seed, ctx.num_workers, balance=ctx.balance)


def fit_adapt(model: nn.Module, loader, data: AdaptData, cfg: AdaptConfig, ctx: AdaptContext, val_x=None, **kw) -> FitResult:
    """pipeline.training.fit with the adapt settings, validated on the val split (or `val_x`, e.g. its features)."""
    settings = replace(TrainSettings.from_adapt(cfg, ctx.budget), select_metric=ctx.select_metric)
    if ctx.balance == "weights":
        settings = replace(settings, class_weights=tuple(class_weights(data.y("train"), data.num_classes).tolist()))
    return fit(
        model, loader, data.x("val") if val_x is None else val_x, data.y("val"),
        settings=settings, desc=ctx.desc, checkpoint_dir=ctx.checkpoint_dir,
        resume=ctx.resume, run_config=ctx.run_config, **kw,
    )


Strategy = Callable[[EdgeClassifier, AdaptData, AdaptConfig, AdaptContext], AdaptOutcome]
log = logging.getLogger(__name__)
STRATEGIES: Registry[Strategy] = Registry("strategy", ConfigError, prefix="adapt.strategy: ")


def register_strategy(name: str):
    """Decorator: register `fn(model, data, cfg, ctx) -> AdaptOutcome` under `name`."""
    return lambda fn: STRATEGIES.add(name, fn)


def list_strategies() -> list[str]:
    return STRATEGIES.names()


def get_strategy(name: str) -> Strategy:
    return STRATEGIES.get(name)


def adapt_model(model: EdgeClassifier, data: AdaptData, cfg: AdaptConfig, ctx: AdaptContext) -> AdaptOutcome:
    """Run the strategy `cfg.strategy` names, with a training budget sized to the data."""
    return get_strategy(cfg.strategy)(model, data, cfg, with_budget(cfg, data, ctx))


def shift_to_rare(out: AdaptOutcome, data: AdaptData, balance: str) -> AdaptOutcome:
    """With data.balance 'weights' or 'sampler': add the prior shift (pipeline.training.balance.prior_shift)
    to the adapted head's bias, so the saved model, its test logits and its val accuracy carry it. Applied
    once per trained model, after its strategy picked the best epoch, as it was measured (run_adapt; each
    candidate of adapt_to_domain before the target judges it)."""
    if balance == "none" or out.model.head.bias is None:
        return out
    shift = prior_shift(data.y("train"), data.num_classes)
    with torch.no_grad():
        out.model.head.bias += shift.to(out.model.head.bias)
    val_acc = float((predict_logits(out.model, data.x("val")).argmax(1) == data.y("val")).float().mean())
    log.info("adapt: data.balance %s: the head's bias shifted by -%g * log(class share) towards the rare classes "
             "(val accuracy %.4f -> %.4f)", balance, PRIOR_SHIFT_TAU, out.val_accuracy, val_acc)
    extra = {**out.extra, "prior_shift": {"tau": PRIOR_SHIFT_TAU, "val_accuracy_before": out.val_accuracy}}
    return replace(out, test_logits=out.test_logits + shift, val_accuracy=val_acc, extra=extra)
