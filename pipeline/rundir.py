"""The run directory `runs/<name>/`: the one place that knows its file names.

Every stage reads and writes here, so any stage can be re-run alone:

    runs/<name>/config.yaml                      the config, as run
    runs/<name>/split.json                       the exact train/val/test files
    runs/<name>/checkpoints/{teacher,student}.safetensors
    runs/<name>/checkpoints/adapt-resume/        while adapt trains (removed when it completes)
    runs/<name>/lora_adapter/                    the LoRA adapter in peft's format
    runs/<name>/metrics.json                     every stage adds its section
    runs/<name>/report.md, *.png, efficiency.json
    runs/<name>/bundle/                          bundle.json + model.onnx (the deployable)
    runs/<name>/tensorrt-cache/                  TensorRT timing and calibration caches

    run = RunDir(cfg.run_dir)            # or cfg.run
    run.update_metrics("teacher", {...})
    model, meta = load_checkpoint(run.checkpoint("teacher"))

(The feature cache is shared across runs and lives in the user cache, see pipeline.features.)
This module does not import torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from runtime.files import atomic_write_text

if TYPE_CHECKING:
    from pipeline.data import Split

Role = Literal["teacher", "student"]
ROLES: tuple[str, ...] = ("teacher", "student")


class RunDir:
    """Paths and files of one run directory. Constructing one touches nothing on disk."""

    CONFIG = "config.yaml"
    SPLIT = "split.json"
    METRICS = "metrics.json"
    REPORT = "report.md"
    CONFUSION_PNG = "confusion_matrix.png"
    CURVES_PNG = "training_curves.png"
    EFFICIENCY_PNG = "efficiency.png"
    EFFICIENCY_JSON = "efficiency.json"
    DATA_CHECK = "data_check.json"
    LORA_ADAPTER = "lora_adapter"
    BUNDLE = "bundle"

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)  # RunDir(run) works too: a RunDir is an os.PathLike of its root

    def __fspath__(self) -> str:
        return str(self.root)

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunDir) and other.root == self.root

    def __hash__(self) -> int:
        return hash(self.root)

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def config(self) -> Path:
        return self.root / self.CONFIG

    @property
    def split(self) -> Path:
        return self.root / self.SPLIT

    @property
    def metrics(self) -> Path:
        return self.root / self.METRICS

    @property
    def report(self) -> Path:
        return self.root / self.REPORT

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint(self, role: str) -> Path:
        """checkpoints/<role>.safetensors, role 'teacher' or 'student'."""
        if role not in ROLES:
            raise ValueError(f"unknown checkpoint role {role!r}; valid: {', '.join(ROLES)}")
        return self.checkpoints / f"{role}.safetensors"

    @property
    def adapt_resume(self) -> Path:
        return self.checkpoints / "adapt-resume"

    @property
    def lora_adapter(self) -> Path:
        return self.root / self.LORA_ADAPTER

    @property
    def bundle(self) -> Path:
        """The default bundle directory."""
        return self.root / self.BUNDLE

    @property
    def tensorrt_cache(self) -> Path:
        return self.root / "tensorrt-cache"

    @property
    def confusion_png(self) -> Path:
        return self.root / self.CONFUSION_PNG

    @property
    def curves_png(self) -> Path:
        return self.root / self.CURVES_PNG

    @property
    def efficiency_png(self) -> Path:
        return self.root / self.EFFICIENCY_PNG

    def reliability_png(self, role: str) -> Path:
        """The reliability diagram (before/after temperature scaling) of a candidate model."""
        return self.root / f"reliability-{role}.png"

    @property
    def efficiency_json(self) -> Path:
        return self.root / self.EFFICIENCY_JSON

    @property
    def data_check(self) -> Path:
        return self.root / self.DATA_CHECK

    def read_metrics(self) -> dict[str, Any]:
        """metrics.json, or {} before any stage wrote it."""
        return json.loads(self.metrics.read_text()) if self.metrics.is_file() else {}

    def update_metrics(self, section: str, values: dict[str, Any]) -> dict[str, Any]:
        """Replace one section of metrics.json (read-modify-write, written atomically); returns the whole file."""
        data = self.read_metrics()
        data[section] = values
        atomic_write_text(self.metrics, json.dumps(data, indent=2) + "\n")
        return data


def load_split(run: RunDir) -> "Split":
    """The run's split.json (DataError naming the file when adapt has not written it yet)."""
    from pipeline.data import Split

    return Split.load(run.split)
