"""finetune: unfreeze the last N block groups of the backbone (or all), with layer-wise LR decay
and optional progressive unfreezing."""

from __future__ import annotations

from torch import nn

from pipeline.config import AdaptConfig
from pipeline.errors import ModelError
from pipeline.models import EdgeClassifier, count_params
from pipeline.strategies.data import AdaptData
from pipeline.strategies.registry import AdaptContext, AdaptOutcome, fit_adapt, loader_for, register_strategy, with_budget
from pipeline.training import param_groups, predict_logits


def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm))


def block_groups(model: EdgeClassifier) -> list[tuple[str, list[nn.Module]]]:
    """The backbone's block groups from stem to head (the head itself is not included).

    timm EfficientNet: conv_stem+bn1, blocks[0..6], conv_head+bn2. Other backbones: their
    top-level children, with a `features` Sequential (torchvision MobileNet/EfficientNet,
    edgekiln's CompactCNN) expanded into its stages. A norm layer joins the group before it;
    modules without parameters are left out.
    """
    bb = model.backbone
    if all(hasattr(bb, a) for a in ("conv_stem", "bn1", "blocks", "conv_head", "bn2")):
        return (
            [("stem", [bb.conv_stem, bb.bn1])]
            + [(f"blocks.{i}", [stage]) for i, stage in enumerate(bb.blocks)]
            + [("conv_head", [bb.conv_head, bb.bn2])]
        )
    children: list[tuple[str, nn.Module]] = []
    for name, child in bb.named_children():
        if name == "features" and isinstance(child, nn.Sequential):
            children += [(f"features.{n}", c) for n, c in child.named_children()]
        else:
            children.append((name, child))
    groups: list[tuple[str, list[nn.Module]]] = []
    for name, child in children:
        if not _has_params(child):
            continue
        if _is_norm(child) and groups:
            groups[-1][1].append(child)
        else:
            groups.append((name, [child]))
    if not groups:
        raise ModelError(f"{model.arch}: the backbone has no parameters to fine-tune")
    return groups


def group_params(mods: list[nn.Module]) -> list[nn.Parameter]:
    return [p for m in mods for p in m.parameters()]


def trainable_groups_at(epoch: int, start: int, n_groups: int, every: int | None) -> int:
    """How many of the last block groups train in `epoch` (1-based) with progressive unfreezing."""
    if not every:
        return min(start, n_groups)
    return min(n_groups, start + (epoch - 1) // every)


def finetune_param_groups(model: EdgeClassifier, layer_decay: float, weight_decay: float) -> list[dict]:
    """Head at lr; backbone group i of n (0 = stem) at lr * layer_decay ** (n - i)."""
    groups = block_groups(model)
    n = len(groups)
    pairs = [(list(model.head.parameters()), 1.0)]
    pairs += [(group_params(mods), layer_decay ** (n - i)) for i, (_, mods) in enumerate(groups)]
    return param_groups(pairs, weight_decay)


def finetune_groups(model: EdgeClassifier, data: AdaptData, cfg: AdaptConfig, ctx: AdaptContext, unfreeze, layer_decay: float,
              progressive_every: int | None) -> AdaptOutcome:
    ctx = with_budget(cfg, data, ctx)
    groups = block_groups(model)
    n = len(groups)
    start = n if unfreeze == "all" else int(unfreeze)
    model.requires_grad_(False)
    model.head.requires_grad_(True)

    def on_epoch_start(epoch: int) -> None:
        k = trainable_groups_at(max(1, epoch), start, n, progressive_every)
        for i, (_, mods) in enumerate(groups):
            for p in group_params(mods):
                p.requires_grad_(i >= n - k)

    on_epoch_start(1)
    pg = finetune_param_groups(model, layer_decay, cfg.weight_decay)
    result = fit_adapt(model, loader_for(data, cfg.augment, ctx), data, cfg, ctx, groups=pg, on_epoch_start=on_epoch_start)
    trainable = count_params(model.head.parameters()) + sum(
        count_params(group_params(mods)) for i, (_, mods) in enumerate(groups)
        if i >= n - trainable_groups_at(ctx.budget.epochs, start, n, progressive_every)
    )
    model.requires_grad_(True)
    test_logits = predict_logits(model, data.x("test"))
    extra = {"block_groups": [name for name, _ in groups], "unfrozen_groups_at_end": trainable_groups_at(ctx.budget.epochs, start, n, progressive_every)}
    return AdaptOutcome(model.cpu().eval(), test_logits, result.best_val_accuracy, result, trainable, extra)


@register_strategy("finetune")
def finetune(model: EdgeClassifier, data: AdaptData, cfg: AdaptConfig, ctx: AdaptContext) -> AdaptOutcome:
    """Unfreeze the last N block groups (or all) with layer-wise LR decay and optional progressive unfreezing."""
    o = cfg.finetune
    return finetune_groups(model, data, cfg, ctx, o.unfreeze, o.layer_decay, o.progressive_every)
