"""Checkpoints as safetensors with their metadata (architecture, classes,
preprocessing) inside, so any stage can rebuild the model from the file alone."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline.errors import ModelError
from pipeline.models import EdgeClassifier, _strict_load, create_model
from runtime.files import atomic_path
from runtime.preprocess import PreprocessSpec


@dataclass(frozen=True)
class CheckpointMeta:
    arch: str
    class_names: list[str]
    preprocess: PreprocessSpec
    role: str
    extra: dict[str, Any]

    def to_json(self) -> str:
        return json.dumps(
            {
                "arch": self.arch,
                "class_names": self.class_names,
                "preprocess": self.preprocess.to_dict(),
                "role": self.role,
                "extra": self.extra,
            }
        )


def save_checkpoint(model: EdgeClassifier, meta: CheckpointMeta, path: Path) -> None:
    """Write atomically: a crash mid-write never leaves a file that looks complete."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"edgekiln": meta.to_json()})


def load_checkpoint(path: Path) -> tuple[EdgeClassifier, CheckpointMeta]:
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint not found: {path}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("edgekiln")
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ModelError(f"{path}: not a readable safetensors checkpoint ({e})") from None
    if raw is None:
        raise ModelError(f"{path}: not an edgekiln checkpoint (no 'edgekiln' metadata)")
    d = json.loads(raw)
    meta = CheckpointMeta(
        arch=d["arch"],
        class_names=d["class_names"],
        preprocess=PreprocessSpec.from_dict(d["preprocess"]),
        role=d.get("role", "model"),
        extra=d.get("extra", {}),
    )
    model = create_model(meta.arch, len(meta.class_names), "none", input_size=meta.preprocess.crop)
    _strict_load(model, state, str(path))
    return model.eval(), meta
