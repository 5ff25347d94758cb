"""feature_extraction: frozen backbone (weights and BatchNorm statistics), new head, trained on
features cached on disk (or fitted as a scikit-learn logistic regression)."""

from __future__ import annotations

from typing import Any

import torch

from pipeline.config import AdaptConfig
from pipeline.features import fit_logistic_regression, weights_digest
from pipeline.models import EdgeClassifier, count_params
from pipeline.strategies.data import AdaptData
from pipeline.strategies.registry import AdaptContext, AdaptOutcome, fit_adapt, loader_for, register_strategy
from pipeline.training import accuracy, predict_logits, tensor_loader


@register_strategy("feature_extraction")
def feature_extraction(model: EdgeClassifier, data: AdaptData, cfg: AdaptConfig, ctx: AdaptContext) -> AdaptOutcome:
    """Frozen backbone (weights and BatchNorm statistics), new head."""
    opts = cfg.feature_extraction
    model.backbone.eval().requires_grad_(False)
    model.head.requires_grad_(True)
    extra: dict[str, Any] = {"head": opts.head}
    if cfg.augment != "none":
        # Augmented images change every epoch, so the backbone runs every epoch (no cache).
        result = fit_adapt(model, loader_for(data, cfg.augment, ctx), data, cfg, ctx)
        test_logits = predict_logits(model, data.x("test"))
        return AdaptOutcome(model.cpu().eval(), test_logits, result.best_val_accuracy, result, count_params(model.head.parameters()), extra)

    digest = weights_digest(model.backbone)
    feats = {p: data.features(p, model.backbone, ctx.arch, digest, opts.cache) for p in data.PARTS}
    extra["feature_cache"] = opts.cache
    head = model.head
    if opts.head == "logistic_regression":
        w, b = fit_logistic_regression(feats["train"], data.y("train"), data.num_classes, opts.C, ctx.seed,
                                      ctx.balance)
        with torch.no_grad():
            head.weight.copy_(w)
            head.bias.copy_(b)
        result = None
        val_acc = accuracy(predict_logits(head, feats["val"]), data.y("val"))
    else:
        loader = tensor_loader(feats["train"], data.y("train"), batch_size=ctx.batch_size, shuffle=True, seed=ctx.seed,
                               balance=ctx.balance)
        result = fit_adapt(head, loader, data, cfg, ctx, val_x=feats["val"])
        val_acc = result.best_val_accuracy
    test_logits = predict_logits(head, feats["test"])
    return AdaptOutcome(model.cpu().eval(), test_logits, val_acc, result, count_params(head.parameters()), extra)
