"""Adapt strategies: one registry, one function per strategy (after timm's `register_model`).

    feature_extraction  frozen backbone (BatchNorm statistics too) + new head, trained on
                        features cached on disk (or a scikit-learn logistic regression)
    finetune            unfreeze the last N block groups (or all), layer-wise LR decay,
                        optional progressive unfreezing
    lora                peft low-rank adapters on the pointwise convolutions and linear
                        layers, merged into the weights before saving

A strategy is `fn(model, data, cfg, ctx) -> AdaptOutcome`: it trains the
pretrained `EdgeClassifier` it is given and returns a plain `EdgeClassifier`
(no extra modules, so export sees an ordinary graph) with its test logits.
`train_from_scratch` and `linear_probe_baseline` are the baselines every run
can be compared with.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from pipeline.config import AdaptConfig
from pipeline.data import Split, eval_transform, load_tensors
from pipeline.errors import ConfigError, EdgekilnError, ModelError, ParityError
from pipeline.features import cached_features, fit_logistic_regression, weights_digest
from pipeline.models import EdgeClassifier, create_model
from pipeline.training import FitResult, TrainSettings, accuracy, fit, param_groups, predict_logits, tensor_loader
from runtime.files import atomic_dir
from runtime.preprocess import PreprocessSpec, open_image

log = logging.getLogger("edgekiln")

LORA_PARITY_TOL = 1e-4


# --------------------------------------------------------------------------- data


def load_uint8(paths: list[Path], spec: PreprocessSpec) -> torch.Tensor:
    """Images after the evaluation transform's resize and crop, still uint8 (for augmentation)."""
    geometry = v2.Compose(eval_transform(spec).transforms[:3])  # Resize, CenterCrop, PILToTensor
    x = torch.empty((len(paths), 3, spec.crop, spec.crop), dtype=torch.uint8)
    for i, p in enumerate(paths):
        x[i] = geometry(open_image(p))
    return x


class AdaptData:
    """The split's images, labels and backbone features, each loaded once when first asked for."""

    PARTS = ("train", "val", "test")

    def __init__(self, paths: dict[str, list[Path]], labels: dict[str, list[int]], spec: PreprocessSpec, class_names: list[str]):
        self.paths, self._labels, self.spec, self.class_names = paths, labels, spec, class_names
        self._memo: dict[tuple, torch.Tensor] = {}

    @classmethod
    def from_split(cls, split: Split, spec: PreprocessSpec) -> "AdaptData":
        return cls(
            {p: split.paths(p) for p in cls.PARTS}, {p: split.labels(p) for p in cls.PARTS}, spec, split.class_names
        )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def labels(self, part: str) -> list[int]:
        return self._labels[part]

    def y(self, part: str) -> torch.Tensor:
        return torch.tensor(self._labels[part], dtype=torch.long)

    def x(self, part: str) -> torch.Tensor:
        """Preprocessed float images (the evaluation transform)."""
        if ("x", part) not in self._memo:
            self._memo["x", part] = load_tensors(self.paths[part], self._labels[part], self.spec, desc=f"loading {part} images")[0]
        return self._memo["x", part]

    def x_uint8(self, part: str) -> torch.Tensor:
        if ("u8", part) not in self._memo:
            self._memo["u8", part] = load_uint8(self.paths[part], self.spec)
        return self._memo["u8", part]

    def features(self, part: str, backbone: nn.Module, arch: str, digest: str, use_cache: bool = True) -> torch.Tensor:
        """Frozen-backbone features, from the on-disk cache when possible."""
        key = ("f", part, digest)
        if key not in self._memo:
            self._memo[key] = cached_features(
                backbone, arch, self.paths[part], self._labels[part], self.spec,
                images=self._memo.get(("x", part)), weights=digest, use_cache=use_cache, desc=f"{part} features",
            )
        return self._memo[key]

    def subset(self, part: str, idx: list[int]) -> "AdaptData":
        """The same data with only `idx` of `part` (the other parts, and everything loaded, shared)."""
        sub = AdaptData(
            {**self.paths, part: [self.paths[part][i] for i in idx]},
            {**self._labels, part: [self._labels[part][i] for i in idx]},
            self.spec,
            self.class_names,
        )
        ids = torch.tensor(idx, dtype=torch.long)
        for key, t in self._memo.items():
            sub._memo[key] = t[ids] if key[1] == part else t
        return sub


AUGMENTATIONS = ("none", "light", "strong")


def train_transform(preset: str, spec: PreprocessSpec) -> v2.Compose:
    """Train-time augmentation (torchvision transforms v2) on uint8 crops, then the evaluation
    transform's ToDtype + Normalize. Evaluation never augments."""
    if preset not in AUGMENTATIONS:
        raise ConfigError(f"unknown augmentation preset '{preset}'; valid: {', '.join(AUGMENTATIONS)}")
    size = spec.crop
    aug: list = []
    if preset == "light":
        aug = [v2.RandomResizedCrop(size, scale=(0.8, 1.0), antialias=True), v2.RandomHorizontalFlip()]
    elif preset == "strong":
        aug = [
            v2.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3),
        ]
    tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(spec.mean), list(spec.std))]
    if preset == "strong":
        tail.append(v2.RandomErasing(p=0.25))
    return v2.Compose(aug + tail)


class AugmentedImages(Dataset):
    def __init__(self, x_uint8: torch.Tensor, y: torch.Tensor, transform):
        self.x, self.y, self.transform = x_uint8, y, transform

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.transform(self.x[i]), self.y[i]


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


@dataclass
class AdaptOutcome:
    model: EdgeClassifier  # trained, plain (no adapters), eval mode, on the CPU
    test_logits: torch.Tensor
    val_accuracy: float
    fit: FitResult | None
    trainable_params: int
    extra: dict[str, Any] = field(default_factory=dict)


def _train_loader(data: AdaptData, augment: str, ctx: AdaptContext) -> DataLoader:
    if augment == "none":
        return tensor_loader(data.x("train"), data.y("train"), batch_size=ctx.batch_size, shuffle=True, seed=ctx.seed)
    ds = AugmentedImages(data.x_uint8("train"), data.y("train"), train_transform(augment, data.spec))
    g = torch.Generator().manual_seed(ctx.seed)
    return DataLoader(ds, batch_size=ctx.batch_size, shuffle=True, generator=g, num_workers=ctx.num_workers)


def _count(params) -> int:
    return sum(p.numel() for p in params)


def _fit(model, loader, data: AdaptData, cfg: AdaptConfig, ctx: AdaptContext, val_x=None, **kw) -> FitResult:
    return fit(
        model, loader, data.x("val") if val_x is None else val_x, data.y("val"),
        settings=TrainSettings.from_adapt(cfg), desc=ctx.desc, checkpoint_dir=ctx.checkpoint_dir,
        resume=ctx.resume, run_config=ctx.run_config, **kw,
    )


# --------------------------------------------------------------------------- registry

Strategy = Callable[[EdgeClassifier, AdaptData, AdaptConfig, AdaptContext], AdaptOutcome]
_STRATEGIES: dict[str, Strategy] = {}


def register_strategy(name: str):
    """Decorator: register `fn(model, data, cfg, ctx) -> AdaptOutcome` under `name`."""

    def deco(fn: Strategy) -> Strategy:
        if name in _STRATEGIES:
            raise ValueError(f"strategy '{name}' is already registered")
        _STRATEGIES[name] = fn
        return fn

    return deco


def list_strategies() -> list[str]:
    return list(_STRATEGIES)


def get_strategy(name: str) -> Strategy:
    if name not in _STRATEGIES:
        raise ConfigError(f"adapt.strategy: unknown strategy '{name}'; valid: {', '.join(_STRATEGIES)}")
    return _STRATEGIES[name]


def adapt_model(model: EdgeClassifier, data: AdaptData, cfg: AdaptConfig, ctx: AdaptContext) -> AdaptOutcome:
    """Run the strategy `cfg.strategy` names."""
    return get_strategy(cfg.strategy)(model, data, cfg, ctx)


# --------------------------------------------------------------------------- block groups


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


def _group_params(mods: list[nn.Module]) -> list[nn.Parameter]:
    return [p for m in mods for p in m.parameters()]


# --------------------------------------------------------------------------- feature extraction


@register_strategy("feature_extraction")
def feature_extraction(model: EdgeClassifier, data: AdaptData, cfg: AdaptConfig, ctx: AdaptContext) -> AdaptOutcome:
    """Frozen backbone (weights and BatchNorm statistics), new head."""
    opts = cfg.feature_extraction
    model.backbone.eval().requires_grad_(False)
    model.head.requires_grad_(True)
    extra: dict[str, Any] = {"head": opts.head}
    if cfg.augment != "none":
        # Augmented images change every epoch, so the backbone runs every epoch (no cache).
        result = _fit(model, _train_loader(data, cfg.augment, ctx), data, cfg, ctx)
        test_logits = predict_logits(model, data.x("test"))
        return AdaptOutcome(model.cpu().eval(), test_logits, result.best_val_accuracy, result, _count(model.head.parameters()), extra)

    digest = weights_digest(model.backbone)
    feats = {p: data.features(p, model.backbone, ctx.arch, digest, opts.cache) for p in data.PARTS}
    extra["feature_cache"] = opts.cache
    head = model.head
    if opts.head == "logistic_regression":
        w, b = fit_logistic_regression(feats["train"], data.y("train"), data.num_classes, opts.C, ctx.seed)
        with torch.no_grad():
            head.weight.copy_(w)
            head.bias.copy_(b)
        result = None
        val_acc = accuracy(predict_logits(head, feats["val"]), data.y("val"))
    else:
        loader = tensor_loader(feats["train"], data.y("train"), batch_size=ctx.batch_size, shuffle=True, seed=ctx.seed)
        result = _fit(head, loader, data, cfg, ctx, val_x=feats["val"])
        val_acc = result.best_val_accuracy
    test_logits = predict_logits(head, feats["test"])
    return AdaptOutcome(model.cpu().eval(), test_logits, val_acc, result, _count(head.parameters()), extra)


# --------------------------------------------------------------------------- fine-tuning


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
    pairs += [(_group_params(mods), layer_decay ** (n - i)) for i, (_, mods) in enumerate(groups)]
    return param_groups(pairs, weight_decay)


def _finetune(model: EdgeClassifier, data: AdaptData, cfg: AdaptConfig, ctx: AdaptContext, unfreeze, layer_decay: float,
              progressive_every: int | None) -> AdaptOutcome:
    groups = block_groups(model)
    n = len(groups)
    start = n if unfreeze == "all" else int(unfreeze)
    model.requires_grad_(False)
    model.head.requires_grad_(True)

    def on_epoch_start(epoch: int) -> None:
        k = trainable_groups_at(max(1, epoch), start, n, progressive_every)
        for i, (_, mods) in enumerate(groups):
            for p in _group_params(mods):
                p.requires_grad_(i >= n - k)

    on_epoch_start(1)
    pg = finetune_param_groups(model, layer_decay, cfg.weight_decay)
    result = _fit(model, _train_loader(data, cfg.augment, ctx), data, cfg, ctx, groups=pg, on_epoch_start=on_epoch_start)
    trainable = _count(model.head.parameters()) + sum(
        _count(_group_params(mods)) for i, (_, mods) in enumerate(groups)
        if i >= n - trainable_groups_at(cfg.epochs, start, n, progressive_every)
    )
    model.requires_grad_(True)
    test_logits = predict_logits(model, data.x("test"))
    extra = {"block_groups": [name for name, _ in groups], "unfrozen_groups_at_end": trainable_groups_at(cfg.epochs, start, n, progressive_every)}
    return AdaptOutcome(model.cpu().eval(), test_logits, result.best_val_accuracy, result, trainable, extra)


@register_strategy("finetune")
def finetune(model: EdgeClassifier, data: AdaptData, cfg: AdaptConfig, ctx: AdaptContext) -> AdaptOutcome:
    """Unfreeze the last N block groups (or all) with layer-wise LR decay and optional progressive unfreezing."""
    o = cfg.finetune
    return _finetune(model, data, cfg, ctx, o.unfreeze, o.layer_decay, o.progressive_every)


# --------------------------------------------------------------------------- LoRA


def _is_pointwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1


def default_lora_targets(model: EdgeClassifier) -> list[str]:
    """The pointwise (1x1) convolutions and linear layers of the backbone: in MobileNet/EfficientNet-style
    networks they hold most of the weights. When they hold less than half of the backbone's
    conv/linear weights (ResNets, CompactCNN) every non-grouped convolution is adapted too."""
    named = [(f"backbone.{n}", m) for n, m in model.backbone.named_modules()]
    linear_like = [(n, m) for n, m in named if isinstance(m, (nn.Conv2d, nn.Linear))]
    chosen = [(n, m) for n, m in linear_like if _is_pointwise(m) or isinstance(m, nn.Linear)]
    total = sum(m.weight.numel() for _, m in linear_like)
    if sum(m.weight.numel() for _, m in chosen) < 0.5 * total:
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
    backbone_params = _count(model.backbone.parameters())
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
    lora_params = _count(p for n, p in peft_model.named_parameters() if "lora_" in n)
    trainable = _count(p for p in peft_model.parameters() if p.requires_grad)
    log.info("lora: %d adapter parameters = %.2f%% of the backbone's %d", lora_params, 100 * lora_params / backbone_params, backbone_params)

    result = _fit(peft_model, _train_loader(data, cfg.augment, ctx), data, cfg, ctx)
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


# --------------------------------------------------------------------------- baselines


def train_from_scratch(arch: str, data: AdaptData, cfg: AdaptConfig, ctx: AdaptContext) -> AdaptOutcome:
    """The same architecture from random initialisation, every layer trained, same epochs and schedule."""
    from pipeline.distill import reset_bn_momentum

    model = create_model(arch, data.num_classes, "none")
    reset_bn_momentum(model)
    return _finetune(model, data, cfg, ctx, "all", 1.0, None)


def linear_probe_baseline(model: EdgeClassifier, data: AdaptData, arch: str, seed: int = 0) -> dict[str, Any]:
    """Logistic regression on the frozen pretrained backbone's (cached) features."""
    digest = weights_digest(model.backbone)
    model.backbone.eval()
    f = {p: data.features(p, model.backbone, arch, digest) for p in data.PARTS}
    w, b = fit_logistic_regression(f["train"], data.y("train"), data.num_classes, seed=seed)  # one fit, two splits
    logits = f["test"].float() @ w.T + b
    val_acc = accuracy(f["val"].float() @ w.T + b, data.y("val"))
    return {"val_accuracy": val_acc, "test_accuracy": accuracy(logits, data.y("test")), "test_logits": logits}
