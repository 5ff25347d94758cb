"""timm models by name (`timm/<name>`): preprocessing from timm's pretrained config, weights from the
hub when online or from a local file, a one-line error naming the file to provide when offline.
pipeline.models resolves the names here.
"""

from __future__ import annotations

from torch import nn

from pipeline.errors import ModelError
from pipeline.models import EdgeClassifier, ModelDefaults, _Entry, _load_state_dict_file, _strict_load
from runtime.preprocess import Size

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


def timm_entry(arch: str) -> _Entry:
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
