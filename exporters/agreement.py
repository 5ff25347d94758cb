"""The images top-1 agreement is measured on: many, and no labels needed.

Agreement asks only "does the artifact pick the class PyTorch picks?", so any image counts:
the held-out images (validation and test) as they are, seeded augmented views of them
(horizontal flip, a crop of 80-100 % of the side at a random place, brightness x0.9-1.1, made
on the decoded image and then sent through the runtime's own preprocessing), and a folder of
unlabeled images when the config names one. The test split itself is compared end to end by
the parity gate (PyTorch with the checkpoint's preprocessing); on the images here both sides
get the same runtime-preprocessed tensor, so what differs is the artifact's arithmetic alone.

    aset = agreement_set(val_paths + test_paths, spec, views=2, seed=0, keep_as_is=val_paths)
    for x in aset.batches(64): ...
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image, ImageEnhance

from runtime.preprocess import PreprocessSpec, open_image, preprocess

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def augmented_view(img: Image.Image, seed: int, index: int, view: int) -> Image.Image:
    """View `view` (>= 1) of image `index`: the same pixels for the same (seed, index, view)."""
    rng = np.random.default_rng([seed, index, view])
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    w, h = img.size
    side = rng.uniform(0.8, 1.0)
    cw, ch = max(1, round(w * side)), max(1, round(h * side))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    img = img.crop((x0, y0, x0 + cw, y0 + ch))
    return ImageEnhance.Brightness(img).enhance(float(rng.uniform(0.9, 1.1)))


@dataclass(frozen=True)
class AgreementSet:
    """(image, view) pairs; view 0 is the image as it is."""

    items: list[tuple[Path, int]]
    spec: PreprocessSpec
    seed: int = 0
    sources: dict[str, int] | None = None  # how many items came from where, for the report

    def __len__(self) -> int:
        return len(self.items)

    def batches(self, size: int = 64) -> Iterator[np.ndarray]:
        """float32 NCHW batches, in order, through runtime.preprocess."""
        for i in range(0, len(self.items), size):
            imgs = []
            for j, (path, view) in enumerate(self.items[i : i + size], start=i):
                img = open_image(path)
                imgs.append(img if view == 0 else augmented_view(img, self.seed, j, view))
            yield preprocess(imgs, self.spec)


def list_images(folder: Path) -> list[Path]:
    """Every image file under `folder` (recursive, sorted)."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def agreement_set(held_out: list[Path], spec: PreprocessSpec, views: int, seed: int = 0,
                  keep_as_is: list[Path] = (), unlabeled: list[Path] = ()) -> AgreementSet:
    """`keep_as_is` images unchanged, `views` augmented views of each `held_out` image, `unlabeled` unchanged."""
    items = [(Path(p), 0) for p in keep_as_is]
    items += [(Path(p), k) for k in range(1, views + 1) for p in held_out]
    items += [(Path(p), 0) for p in unlabeled]
    return AgreementSet(items, spec, seed, {"held_out_as_is": len(keep_as_is), "augmented_views": views * len(held_out),
                                            "unlabeled": len(unlabeled)})


def torch_runner(model: Any) -> Callable[[np.ndarray], np.ndarray]:
    """The PyTorch model as a float32 NCHW batch -> logits function (the reference on an agreement set)."""
    import torch

    model.eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(np.ascontiguousarray(x))).float().numpy()

    return run
