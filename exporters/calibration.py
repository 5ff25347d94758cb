"""Calibration data for INT8: a class-stratified subset of the training split,
fed through the runtime's own preprocessing, behind onnxruntime's one-method
reader interface (`get_next()` returns a feed dict, then None at the end).

The same subset feeds TensorRT's entropy calibrator (exporters.tensorrt).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from runtime.preprocess import PreprocessSpec, preprocess


@dataclass(frozen=True)
class CalibrationSet:
    """Preprocessed calibration images (float32 NCHW) and where they came from."""

    images: np.ndarray
    files: list[str]
    per_class: dict[str, int]

    def summary(self) -> dict:
        return {"split": "train", "images": len(self.files), "per_class": self.per_class}


def stratified_indices(labels: list[int], size: int, n_classes: int, seed: int | None = 0,
                       interleave: bool = False) -> list[int]:
    """`size` indices spread as evenly as possible over the classes (a class with too few images
    gives all it has and the rest goes to the others). Each class's images are drawn in a seeded
    random order, or in file order with seed=None. Returned sorted by position, or with
    `interleave` one class after another (the first of every class, then the second, ...).

    The one per-class sampler: INT8/TensorRT calibration (seeded) and golden images (file order).
    """
    labels_a = np.asarray(labels)
    rng = np.random.default_rng(seed) if seed is not None else None
    pools = [np.nonzero(labels_a == c)[0] for c in range(n_classes)]
    if rng is not None:
        pools = [rng.permutation(p) for p in pools]
    take = [0] * n_classes
    remaining = min(size, len(labels_a))
    # Round-robin over classes that still have images: even shares, no class over-represented.
    while remaining > 0:
        progressed = False
        for c in range(n_classes):
            if remaining and take[c] < len(pools[c]):
                take[c] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            break
    if interleave:
        return [int(pools[c][d]) for d in range(max(take, default=0)) for c in range(n_classes) if d < take[c]]
    return sorted(int(i) for c in range(n_classes) for i in pools[c][: take[c]])


def calibration_set(
    items: list[tuple[str, int]], root: Path, class_names: list[str], spec: PreprocessSpec, size: int, seed: int = 0
) -> CalibrationSet:
    """Pick and preprocess the calibration subset of `items` (the training split's (file, label) pairs)."""
    idx = stratified_indices([y for _, y in items], size, len(class_names), seed)
    files = [items[i][0] for i in idx]
    counts = np.bincount([items[i][1] for i in idx], minlength=len(class_names))
    images = preprocess([Path(root) / f for f in files], spec)
    return CalibrationSet(images=images, files=files, per_class={n: int(k) for n, k in zip(class_names, counts)})


def uniform_batch_size(n: int, limit: int = 32) -> int:
    """Largest batch size <= limit that divides n: histogram calibrators need equal-shaped batches."""
    return max(b for b in range(1, min(limit, n) + 1) if n % b == 0)


class ArrayCalibrationReader(CalibrationDataReader):
    """onnxruntime's calibration reader over an in-memory NCHW array."""

    def __init__(self, images: np.ndarray, input_name: str, batch_size: int | None = None):
        self.images = images
        self.input_name = input_name
        self.batch_size = batch_size or uniform_batch_size(len(images))
        self._pos = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._pos >= len(self.images):
            return None
        batch = self.images[self._pos : self._pos + self.batch_size]
        self._pos += self.batch_size
        return {self.input_name: batch}

    def rewind(self) -> None:
        self._pos = 0
