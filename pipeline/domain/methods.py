"""The domain methods and `auto`: each takes the pretrained model, the source data, the adapt config
and context and the target set, and returns the strategy's AdaptOutcome (a plain model)."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader

from pipeline.config import AdaptConfig
from pipeline.domain.adabn import adapt_batchnorm
from pipeline.domain.dann import DannWrapper, dann_loss
from pipeline.domain.style import restyled_copies
from pipeline.domain.target import TargetSet, normalize
from pipeline.models import EdgeClassifier
from pipeline.strategies import AdaptContext, AdaptData, adapt_model
from pipeline.strategies.registry import AdaptOutcome, fit_adapt, with_budget
from pipeline.training import accuracy, param_groups, predict_logits

log = logging.getLogger("edgekiln")

STYLE_COPIES = 2  # styled copies of every labeled source image, next to the original
Method = Callable[[EdgeClassifier, AdaptData, AdaptConfig, AdaptContext, TargetSet], AdaptOutcome]


def styled_data(data: AdaptData, target: TargetSet, seed: int, copies: int = STYLE_COPIES) -> tuple[AdaptData, dict]:
    """`data` whose training part holds the originals plus `copies` styled versions of each."""
    src = data.x_uint8("train")
    styled, s_stats, t_stats = restyled_copies(src, target.x_uint8, seed, copies)
    u8 = torch.cat([src, styled])
    k = copies + 1
    out = AdaptData({**data.paths, "train": data.paths["train"] * k},
                    {**data._labels, "train": data.labels("train") * k}, data.spec, data.class_names)
    for key, t in data._memo.items():
        if key[1] != "train":
            out._memo[key] = t
    out._memo["u8", "train"] = u8
    out._memo["x", "train"] = normalize(u8, data.spec)
    return out, {"source": s_stats.to_dict(), "target": t_stats.to_dict(), "copies": copies}


def _uncached(cfg: AdaptConfig) -> AdaptConfig:
    """Styled images share their originals' paths, so the feature cache (keyed by paths) is off."""
    return cfg.model_copy(update={"feature_extraction": cfg.feature_extraction.model_copy(update={"cache": False})})


def method_none(model, data, cfg, ctx, target) -> AdaptOutcome:
    return adapt_model(model, data, cfg, ctx)


def method_style(model, data, cfg, ctx, target) -> AdaptOutcome:
    sdata, info = styled_data(data, target, ctx.seed)
    log.info("domain style: blur sigma %.1f px, noise %.3f; %d styled copies per source image",
             info["target"]["blur_sigma"], info["target"]["add_noise"], info["copies"])
    out = adapt_model(model, sdata, _uncached(cfg), ctx)
    out.extra = {**out.extra, "style": info}
    return out


def method_adabn(model, data, cfg, ctx, target) -> AdaptOutcome:
    out = adapt_model(model, data, cfg, ctx)
    n = adapt_batchnorm(out.model, target.x())
    out.model.eval()
    out.test_logits = predict_logits(out.model, data.x("test"))
    out.extra = {**out.extra, "adabn_layers": n}
    return out


def method_dann(model, data, cfg, ctx, target) -> AdaptOutcome:
    """Fine-tune every block group (layer-wise LR decay) with the domain classifier through the GRL;
    source and target images are shuffled together, a target row has label -1."""
    from pipeline.models import count_params
    from pipeline.strategies.data import AugmentedImages, train_transform
    from pipeline.strategies.finetune import finetune_param_groups

    ctx = with_budget(cfg, data, ctx)
    x = torch.cat([data.x_uint8("train"), target.x_uint8])
    y = torch.cat([data.y("train"), torch.full((len(target.x_uint8),), -1, dtype=torch.long)])
    loader = DataLoader(AugmentedImages(x, y, train_transform(cfg.augment, data.spec)), batch_size=ctx.batch_size,
                        shuffle=True, generator=torch.Generator().manual_seed(ctx.seed))
    model.requires_grad_(True)
    wrapper = DannWrapper(model, ctx.budget.epochs * len(loader))
    groups = finetune_param_groups(model, cfg.finetune.layer_decay, cfg.weight_decay)
    groups += param_groups([(list(wrapper.domain_head.parameters()), 1.0)], cfg.weight_decay)
    result = fit_adapt(wrapper, loader, data, cfg, ctx, groups=groups, loss_fn=dann_loss, eval_model=model)
    model.eval()
    return AdaptOutcome(model.cpu().eval(), predict_logits(model, data.x("test")), result.best_val_accuracy, result,
                        count_params(model.parameters()), {"dann": {"steps": int(wrapper.step), "final_lambda": wrapper.lam}})


def method_ssl(model, data, cfg, ctx, target) -> AdaptOutcome:
    """SimCLR warm-up of the backbone on target + source images (pipeline.domain.ssl), then the adapt strategy."""
    from pipeline.domain.ssl import ssl_warmup

    x = torch.cat([target.x_uint8, data.x_uint8("train")])
    info = ssl_warmup(model, x, data.spec, cfg.ssl_steps, ctx.batch_size, ctx.seed, desc=f"{ctx.desc}: ssl warm-up")
    out = adapt_model(model, data, cfg, ctx)
    out.extra = {**out.extra, "ssl": info}
    return out


METHODS: dict[str, Method] = {"none": method_none, "style": method_style, "adabn": method_adabn, "dann": method_dann,
                              "ssl": method_ssl}


def target_accuracy(model: EdgeClassifier, target: TargetSet) -> float | None:
    if target.labeled_y is None:
        return None
    return accuracy(predict_logits(model, target.labeled_x()), target.labeled_y)


def run_method(name: str, model: EdgeClassifier, data: AdaptData, cfg: AdaptConfig, ctx: AdaptContext,
               target: TargetSet) -> AdaptOutcome:
    """One method on a fresh copy of the pretrained model (the caller's stays untouched)."""
    from dataclasses import replace

    return METHODS[name](copy.deepcopy(model), data, cfg, replace(ctx, desc=f"{ctx.desc} [domain {name}]"), target)
