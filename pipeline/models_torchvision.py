"""torchvision classifiers as edgekiln models (`torchvision/<name>`): one `TorchvisionFamily` row per
family says what the weights do not (input-size limits, auxiliary heads, conv classifiers, LoRA targets);
preprocessing comes from the weights' own transforms. pipeline.models resolves the names here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import ModelError
from pipeline.models import (IMAGENET_MEAN, IMAGENET_STD, EdgeClassifier, ModelDefaults, _Entry, _load_state_dict_file,
                             _strict_load)
from runtime.preprocess import Size, size_hw
from runtime.registry import Registry

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


def torchvision_entry(arch: str) -> _Entry:
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
