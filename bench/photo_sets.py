"""Small real-photo ImageFolders built offline, for checking that defaults work beyond the digits demo.

    python bench/photo_sets.py /tmp/photosets            # writes lfw_faces/, textures/, scenes/
    edgekiln run cfg.yaml                                  # with only data.root set to one of them

Sources are the real photographs that ship inside scikit-image (no download):
- lfw_faces: `lfw_subset()`, 100 Labeled-Faces-in-the-Wild faces vs 100 non-face patches (25x25, gray);
- textures: random crops (varied size, position, flips, 90-degree turns) of the brick, grass and
  gravel texture photographs, 60 per class;
- scenes: random crops of five colour photographs (astronaut, coffee, chelsea, rocket,
  immunohistochemistry), 40 per class; crops of one photo share content, so this set is easy
  for a good model and tests the pipeline's plumbing on RGB photos more than its accuracy.
Crops are saved as JPEG at quality 90, as user photos usually are. Deterministic (seeded).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image


def _crops(img: np.ndarray, n: int, rng: np.random.Generator, out: int = 128) -> list[Image.Image]:
    h, w = img.shape[:2]
    res = []
    for _ in range(n):
        side = int(rng.integers(min(h, w) // 4, min(h, w) // 2 + 1))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = img[y : y + side, x : x + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        crop = np.rot90(crop, int(rng.integers(0, 4)))
        res.append(Image.fromarray(np.ascontiguousarray(crop)).resize((out, out), Image.Resampling.BILINEAR))
    return res


def _save(root: Path, cls: str, images: list[Image.Image]) -> None:
    d = root / cls
    d.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        im.convert("RGB").save(d / f"{cls}-{i:03d}.jpg", quality=90)


def build(dest: Path, seed: int = 0) -> dict[str, Path]:
    import skimage.data as data

    rng = np.random.default_rng(seed)
    sets = {name: dest / name for name in ("lfw_faces", "textures", "scenes")}
    faces = data.lfw_subset()  # 100 faces, then 100 non-faces, float in [0, 1]
    for cls, block in (("face", faces[:100]), ("not_face", faces[100:])):
        _save(sets["lfw_faces"], cls, [Image.fromarray((f * 255).round().astype(np.uint8)) for f in block])
    for cls in ("brick", "grass", "gravel"):
        _save(sets["textures"], cls, _crops(getattr(data, cls)(), 60, rng))
    for cls in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry"):
        _save(sets["scenes"], cls, _crops(getattr(data, cls)(), 40, rng))
    return sets


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "photosets")
    for name, path in build(out).items():
        n = sum(1 for _ in path.rglob("*.jpg"))
        print(f"{name}: {n} images in {len(list(path.iterdir()))} classes -> {path}")
