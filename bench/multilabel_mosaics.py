"""A multi-label image set built offline from the photographs that ship inside scikit-image.

    python bench/multilabel_mosaics.py /tmp/mosaics [N]        # N images (default 300) + labels.csv
    edgekiln run /tmp/mosaics/labels.csv --set data.task=multilabel

Each image is a 2x2 mosaic (128x128 RGB, JPEG quality 90) of random crops (size, position, flips,
90-degree turns) of 2 to 4 of six photographs (astronaut, coffee, chelsea, rocket,
immunohistochemistry, hubble_deep_field); its label set is the photographs present. Deterministic
(seeded). Crops of one photo share content, so this tests the multi-label plumbing on RGB photos
more than a model's accuracy.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from photo_sets import _crops  # noqa: E402  (the same crops as the photo sets)

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")


def _crop(img: np.ndarray, rng: np.random.Generator, out: int) -> np.ndarray:
    """One random crop, as the photo sets draw them (bench/photo_sets.py)."""
    return np.asarray(_crops(img, 1, rng, out)[0])


def write_mosaics(root: Path, n: int = 300, seed: int = 0, cell: int = 64) -> Path:
    """`n` mosaics under root/img/ and root/labels.csv (`path,labels`, labels joined by `|`)."""
    from skimage import data

    photos = {name: getattr(data, name)()[..., :3] for name in PHOTOS}
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        k = int(rng.integers(2, 5))
        chosen = sorted(rng.choice(len(PHOTOS), size=k, replace=False).tolist())
        cells = chosen + rng.choice(chosen, size=4 - k).tolist()
        rng.shuffle(cells)
        tiles = [_crop(photos[PHOTOS[c]], rng, cell) for c in cells]
        mosaic = np.concatenate([np.concatenate(tiles[:2], 1), np.concatenate(tiles[2:], 1)], 0)
        rel = f"img/{i:04d}.jpg"
        Image.fromarray(mosaic).save(root / rel, quality=90)
        rows.append((rel, "|".join(PHOTOS[c] for c in chosen)))
    path = root / "labels.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "labels"])
        w.writerows(rows)
    return path


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python bench/multilabel_mosaics.py OUT_DIR [N]")
    print(write_mosaics(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 300))
