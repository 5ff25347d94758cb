"""Resumable training checkpoints that never run code when loaded.

    <dir>/state.json                      epoch, history, best accuracy, config, optimizer/scheduler
                                          settings; every tensor replaced by {"__tensor__": key}
    <dir>/state-epochNNNN.safetensors     those tensors (optimizer moments, RNG states)
    <dir>/model-epochNNNN.safetensors     the model's weights after that epoch
    <dir>/best-epochNNNN.safetensors      the best validation epoch's weights

JSON and safetensors only: a pickle (`torch.load(weights_only=False)`) would execute whatever a
tampered run directory holds. state.json is written last and atomically, so it always names
complete files; the files of earlier epochs are removed after it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from pipeline.errors import EdgekilnError
from runtime.files import atomic_path, atomic_write_text

STATE_FILE = "state.json"
_TENSOR, _ITEMS, _TUPLE = "__tensor__", "__items__", "__tuple__"


def _encode(obj: Any, tensors: dict[str, torch.Tensor], key: str) -> Any:
    """A JSON-able copy of `obj` with its tensors moved into `tensors` (keys: their paths in `obj`)."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().to("cpu", copy=True).contiguous()
        return {_TENSOR: key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _encode(v, tensors, f"{key}.{k}") for k, v in obj.items()}
        # An optimizer's state is keyed by parameter index; JSON objects only have string keys.
        return {_ITEMS: [[k, _encode(v, tensors, f"{key}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {_TUPLE: [_encode(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"resume state: cannot store {type(obj).__name__} at {key}")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if _TENSOR in obj:
            return tensors[obj[_TENSOR]]
        if _ITEMS in obj:
            return {k: _decode(v, tensors) for k, v in obj[_ITEMS]}
        if _TUPLE in obj:
            return tuple(_decode(v, tensors) for v in obj[_TUPLE])
        return {k: _decode(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))


def save_resume_state(ckpt_dir: Path, model: torch.nn.Module, best_state: dict | None, state: dict) -> None:
    """Weights and the state's tensors as safetensors, the rest as JSON (state.json, written last)."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    epoch = state["epoch"]
    weights, tensors_file = f"model-epoch{epoch:04d}.safetensors", f"state-epoch{epoch:04d}.safetensors"
    _save_tensors(model.state_dict(), ckpt_dir / weights)
    state = {**state, "weights": weights, "best_weights": None, "tensors": tensors_file}
    if best_state is not None:
        best = f"best-epoch{state['best_epoch']:04d}.safetensors"
        if not (ckpt_dir / best).is_file():
            _save_tensors(best_state, ckpt_dir / best)
        state["best_weights"] = best
    tensors: dict[str, torch.Tensor] = {}
    doc = _encode(state, tensors, "state")
    _save_tensors(tensors, ckpt_dir / tensors_file)
    atomic_write_text(ckpt_dir / STATE_FILE, json.dumps(doc) + "\n")
    keep = {weights, state["best_weights"], tensors_file}
    for p in ckpt_dir.glob("*.safetensors"):
        if p.name not in keep:
            p.unlink(missing_ok=True)


def load_resume_state(ckpt_dir: Path) -> tuple[dict, dict, dict | None]:
    """(state, model weights, best weights) of a resumable checkpoint."""
    from safetensors.torch import load_file

    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / STATE_FILE
    if not path.is_file():
        if (ckpt_dir / "state.pt").is_file():
            raise EdgekilnError(f"{ckpt_dir}: a resumable checkpoint of an older edgekiln (state.pt, a pickle, "
                                "which is never loaded); run without --resume to start training")
        raise EdgekilnError(f"no resumable checkpoint in {ckpt_dir}; run without --resume to start training")
    doc = json.loads(path.read_text())
    state = _decode(doc, load_file(str(ckpt_dir / doc["tensors"])))
    weights = load_file(str(ckpt_dir / state["weights"]))
    best = load_file(str(ckpt_dir / state["best_weights"])) if state.get("best_weights") else None
    return state, weights, best


def rng_state(loader: DataLoader) -> dict:
    g = getattr(loader, "generator", None)
    return {"torch": torch.get_rng_state(), "loader": g.get_state() if g is not None else None}


def set_rng_state(loader: DataLoader, s: dict) -> None:
    torch.set_rng_state(s["torch"])
    g = getattr(loader, "generator", None)
    if g is not None and s.get("loader") is not None:
        g.set_state(s["loader"])
