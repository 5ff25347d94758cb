"""Calibration data for INT8: a class-stratified subset of the training split,
fed through the runtime's own preprocessing, behind onnxruntime's one-method
reader interface (`get_next()` returns a feed dict, then None at the end).

Images are decoded and preprocessed a batch at a time (`ImageSource`), so a pass over
500 calibration images at 224 px holds one batch, not 300 MB of pixels; the readers also
answer `len()` and `set_range()`, which onnxruntime's strided calibration
(`extra_options["CalibStridedMinMax"]`) uses to reduce the ranges after every chunk
instead of keeping every batch's outputs until the end (exporters.quantize).

The same subset feeds TensorRT's entropy calibrator (exporters.tensorrt) and NNCF
(exporters.openvino), which take it as one array (`CalibrationSet.images`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from runtime.preprocess import PreprocessSpec, preprocess


class ImageSource:
    """Images preprocessed on demand, one batch at a time: a pass over them holds one batch,
    whatever their number. Built from image files (with their preprocessing) or from an array."""

    def __init__(self, paths: list[Path] | None = None, spec: PreprocessSpec | None = None,
                 array: np.ndarray | None = None):
        if (array is None) == (paths is None):
            raise ValueError("ImageSource: give image paths (with their preprocessing) or an array")
        self.paths, self.spec, self.array = paths, spec, array

    def __len__(self) -> int:
        return len(self.array) if self.array is not None else len(self.paths)

    def slice(self, start: int, stop: int) -> np.ndarray:
        if self.array is not None:
            return self.array[start:stop]
        return preprocess(self.paths[start:stop], self.spec)

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        for i in range(0, len(self), batch_size):
            yield self.slice(i, i + batch_size)

    def image_bytes(self) -> int:
        """Bytes of one preprocessed image (float32 CHW)."""
        if self.array is not None:
            return int(self.array[0].nbytes) if len(self.array) else 0
        return 3 * self.spec.height * self.spec.width * 4


def as_source(images: "np.ndarray | ImageSource") -> ImageSource:
    return images if isinstance(images, ImageSource) else ImageSource(array=np.asarray(images, dtype=np.float32))


@dataclass(frozen=True)
class CalibrationSet:
    """The calibration images (files of the training split, with the preprocessing they go through)."""

    paths: list[Path]
    spec: PreprocessSpec
    files: list[str]
    per_class: dict[str, int]

    def source(self) -> ImageSource:
        return ImageSource(self.paths, self.spec)

    @cached_property
    def images(self) -> np.ndarray:
        """All of them as one float32 NCHW array (TensorRT's and NNCF's calibrators take one)."""
        return preprocess(self.paths, self.spec)

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
    return CalibrationSet(paths=[Path(root) / f for f in files], spec=spec, files=files,
                          per_class={n: int(k) for n, k in zip(class_names, counts)})


def uniform_batch_size(n: int, limit: int = 32) -> int:
    """Largest batch size <= limit that divides n: histogram calibrators need equal-shaped batches."""
    return max(b for b in range(1, min(limit, n) + 1) if n % b == 0)


class SourceCalibrationReader(CalibrationDataReader):
    """onnxruntime's calibration reader over an ImageSource (or an array), a batch per `get_next()`.

    `len()` is the number of batches and `set_range(start, end)` (in batches) limits the next pass:
    the interface of onnxruntime's strided calibration."""

    def __init__(self, images: "np.ndarray | ImageSource", input_name: str, batch_size: int | None = None):
        self.source = as_source(images)
        self.input_name = input_name
        self.batch_size = batch_size or uniform_batch_size(len(self.source))
        self._pos, self._end = 0, len(self)

    def __len__(self) -> int:
        return -(-len(self.source) // self.batch_size)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._pos, self._end = start_index, min(end_index, len(self))

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._pos >= self._end:
            return None
        start = self._pos * self.batch_size
        self._pos += 1
        return {self.input_name: self.source.slice(start, start + self.batch_size)}

    def rewind(self) -> None:
        self._pos, self._end = 0, len(self)


ArrayCalibrationReader = SourceCalibrationReader  # the name it had when it only took arrays
