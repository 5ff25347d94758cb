"""lora: peft low-rank adapters on the backbone's pointwise convolutions and linear layers (frozen
backbone, trained head), merged into the weights before saving; the adapter is also saved in
peft's own format."""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from pipeline.config import AdaptConfig
from pipeline.errors import ConfigError, EdgekilnError, ModelError, ParityError
from pipeline.models import EdgeClassifier, count_params
from pipeline.strategies.data import AdaptData
from pipeline.strategies.registry import AdaptContext, AdaptOutcome, fit_adapt, loader_for, register_strategy
from pipeline.training import predict_logits
from runtime.files import atomic_dir

log = logging.getLogger("edgekiln")

LORA_PARITY_TOL = 1e-4


def _is_pointwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1


def _transformer_like(named: list[tuple[str, nn.Module]]) -> bool:
    """More weights in linear layers and attention than in convolutions (timm models, whose family the
    registry does not name)."""
    lin = count_params(p for _, m in named if isinstance(m, (nn.Linear, nn.MultiheadAttention)) for p in m.parameters(recurse=False))
    conv = count_params(m.weight for _, m in named if isinstance(m, nn.Conv2d))
    return lin > conv


def default_lora_targets(model: EdgeClassifier) -> list[str]:
    """The family's default adapter targets (pipeline.models.ModelDefaults.lora_targets).

    "linear" (ViT, Swin, MaxViT): attention (nn.MultiheadAttention as a whole: its qkv in-projection and
    its output projection; or the qkv/projection linears) and the MLP linears, as in the LoRA paper.
    "pointwise" (CNNs): the pointwise (1x1) convolutions and linear layers of the backbone: in
    MobileNet/EfficientNet-style networks they hold most of the weights. When they hold less than half
    of the backbone's conv/linear weights (ResNets, CompactCNN) every non-grouped convolution is adapted too.
    """
    named = [(f"backbone.{n}", m) for n, m in model.backbone.named_modules()]
    kind = model.defaults.lora_targets
    if kind == "auto":
        kind = "linear" if _transformer_like(named) else "pointwise"
    if kind == "mlp":
        chosen_names = [n for n, m in named if isinstance(m, nn.Linear) and ".mlp." in f"{n}."]
        if chosen_names:
            return chosen_names
    if kind == "linear":
        mha = [n for n, m in named if isinstance(m, nn.MultiheadAttention)]
        chosen_names = mha + [n for n, m in named if isinstance(m, nn.Linear)
                              and not any(n.startswith(a + ".") for a in mha)]  # out_proj: adapted with its MHA
        if chosen_names:
            return chosen_names
    linear_like = [(n, m) for n, m in named if isinstance(m, (nn.Conv2d, nn.Linear))]
    chosen = [(n, m) for n, m in linear_like if _is_pointwise(m) or isinstance(m, nn.Linear)]
    total = count_params(m.weight for _, m in linear_like)
    if count_params(m.weight for _, m in chosen) < 0.5 * total:
        chosen = [(n, m) for n, m in linear_like if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)]
    if not chosen:
        raise ModelError(f"{model.arch}: no convolution or linear layer to put LoRA adapters on")
    return [n for n, _ in chosen]


def _save_adapter(peft_model, head: nn.Module, dest: Path) -> None:
    """peft's own format (adapter_config.json + adapter_model.safetensors), plus the new head,
    written to a temp dir and renamed into place."""
    from safetensors.torch import save_file

    with atomic_dir(dest) as tmp:
        peft_model.save_pretrained(str(tmp))
        save_file({k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}, str(tmp / "head.safetensors"))


@register_strategy("lora")
def lora(model: EdgeClassifier, data: AdaptData, cfg: AdaptConfig, ctx: AdaptContext) -> AdaptOutcome:
    """LoRA adapters (peft) on a frozen backbone + a trained head; merged into the weights at the end."""
    from peft import LoraConfig, get_peft_model

    o = cfg.lora
    targets = o.target_modules or default_lora_targets(model)
    backbone_params = count_params(model.backbone.parameters())
    try:
        peft_model = get_peft_model(
            model, LoraConfig(r=o.rank, lora_alpha=o.alpha, lora_dropout=o.dropout, target_modules=targets, bias="none")
        )
    except ValueError as e:
        names = ", ".join(default_lora_targets(model)[:4])
        raise ConfigError(f"adapt.lora.target_modules: {e.__class__.__name__}: {str(e).splitlines()[0]} (e.g. {names})") from None
    # peft freezes everything but the adapters; the new head trains fully. (Not via peft's
    # modules_to_save: it matches name suffixes, and "head" would also catch timm's conv_head.)
    base = peft_model.base_model.model
    base.head.requires_grad_(True)
    lora_params = count_params(p for n, p in peft_model.named_parameters() if "lora_" in n)
    trainable = count_params(p for p in peft_model.parameters() if p.requires_grad)
    log.info("lora: %d adapter parameters = %.2f%% of the backbone's %d", lora_params, 100 * lora_params / backbone_params, backbone_params)

    result = fit_adapt(peft_model, loader_for(data, cfg.augment, ctx), data, cfg, ctx)
    peft_model.cpu().eval()
    if ctx.adapter_dir is not None and ctx.is_main:
        _save_adapter(peft_model, base.head, Path(ctx.adapter_dir))

    probe = data.x("val")[:64]
    unmerged = predict_logits(peft_model, probe)
    merged = peft_model.merge_and_unload()
    if not isinstance(merged, EdgeClassifier) or any("lora_" in k for k in merged.state_dict()):
        raise EdgekilnError("LoRA merge left adapter modules in the model")
    diff = float((predict_logits(merged, probe) - unmerged).abs().max()) if len(probe) else 0.0
    if diff > LORA_PARITY_TOL:
        raise ParityError(f"merged LoRA model disagrees with the adapters: max |Δlogit| {diff:.2e} > {LORA_PARITY_TOL:g}")
    merged.requires_grad_(True)
    test_logits = predict_logits(merged, data.x("test"))
    extra = {
        "lora": {
            "rank": o.rank, "alpha": o.alpha, "dropout": o.dropout, "target_modules": len(targets),
            "adapter_params": lora_params, "backbone_params": backbone_params,
            "trainable_fraction_of_backbone": lora_params / backbone_params,
            "merge_max_abs_logit_diff": diff,
            "adapter_dir": str(ctx.adapter_dir) if ctx.adapter_dir is not None else None,
        }
    }
    return AdaptOutcome(merged.eval(), test_logits, result.best_val_accuracy, result, trainable, extra)
