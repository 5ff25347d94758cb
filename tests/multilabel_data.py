"""A tiny multi-label data set built offline: each image is a 2x2 mosaic of scikit-learn digits
drawn from 1 to 3 of the classes, and its label set is the digits present."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image


def write_digit_mosaics(root: Path, n: int = 60, classes=(0, 1, 2, 3), seed: int = 0, fmt: str = "csv",
                        separator: str = "|") -> Path:
    """`n` 16x16 grayscale mosaics under root/img/ and a manifest root/labels.<fmt> (`path,labels`);
    returns the manifest. Deterministic (seeded)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(seed)
    pools = {c: np.nonzero(d.target == c)[0] for c in classes}
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        k = int(rng.integers(1, min(3, len(classes)) + 1))
        chosen = sorted(int(c) for c in rng.choice(classes, size=k, replace=False))
        cells = chosen + [int(c) for c in rng.choice(chosen, size=4 - k)]
        rng.shuffle(cells)
        tiles = [d.images[int(rng.choice(pools[c]))] for c in cells]
        mosaic = np.block([[tiles[0], tiles[1]], [tiles[2], tiles[3]]])
        rel = f"img/{i:03d}.png"
        Image.fromarray(np.round(mosaic * (255 / 16)).astype(np.uint8), mode="L").save(root / rel)
        rows.append((rel, [f"digit{c}" for c in chosen]))
    if fmt == "jsonl":
        import json

        path = root / "labels.jsonl"
        path.write_text("".join(json.dumps({"path": p, "labels": ls}) + "\n" for p, ls in rows))
        return path
    path = root / "labels.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "labels"])
        w.writerows((p, separator.join(ls)) for p, ls in rows)
    return path
