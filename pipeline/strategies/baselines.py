"""The baselines every adapted model can be compared with: the same architecture trained from
scratch, and a linear probe on the frozen pretrained features."""

from __future__ import annotations

from typing import Any

from pipeline.config import AdaptConfig
from pipeline.features import fit_logistic_regression, weights_digest
from pipeline.models import EdgeClassifier, create_model
from pipeline.strategies.data import AdaptData
from pipeline.strategies.finetune import finetune_groups
from pipeline.strategies.registry import AdaptContext, AdaptOutcome
from pipeline.training import accuracy
from pipeline.training.balance import prior_shift


def train_from_scratch(arch: str, data: AdaptData, cfg: AdaptConfig, ctx: AdaptContext) -> AdaptOutcome:
    """The same architecture from random initialisation, every layer trained, same epochs and schedule."""
    from pipeline.distill import reset_bn_momentum

    model = create_model(arch, data.num_classes, "none", input_size=data.spec.crop)
    reset_bn_momentum(model)
    return finetune_groups(model, data, cfg, ctx, "all", 1.0, None)


def linear_probe_baseline(model: EdgeClassifier, data: AdaptData, arch: str, seed: int = 0,
                          balance: str = "none") -> dict[str, Any]:
    """Logistic regression on the frozen pretrained backbone's (cached) features, with the run's
    data.balance (class weights for 'weights' and 'sampler'), so it compares like with like."""
    digest = weights_digest(model.backbone)
    model.backbone.eval()
    f = {p: data.features(p, model.backbone, arch, digest) for p in data.PARTS}
    w, b = fit_logistic_regression(f["train"], data.y("train"), data.num_classes, seed=seed,  # one fit, two splits
                                  balance=balance)
    if balance != "none":  # the shift adapt gives the head (shift_to_rare), so it compares like with like
        b = b + prior_shift(data.y("train"), data.num_classes)
    logits = f["test"].float() @ w.T + b
    val_acc = accuracy(f["val"].float() @ w.T + b, data.y("val"))
    return {"val_accuracy": val_acc, "test_accuracy": accuracy(logits, data.y("test")), "test_logits": logits}
