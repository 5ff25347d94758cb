"""Write a folder of out-of-distribution images for the digits demo (issue 17): photos that are no digit.

    python bench/ood_images.py /tmp/ood            # then: edgekiln demo --ood /tmp/ood

Sources, all bundled with scikit-image (offline): the 200 face crops of `skimage.data.lfw_subset()`
(25x25 grayscale, from Labeled Faces in the Wild) and scikit-image's sample photos and textures
(astronaut, camera, coffee, chelsea, rocket, brick, grass, gravel, ...), each cut into a few
seeded random square crops so that one photo does not count as one image only. Every image is
resized to 64x64 (the demo's digits are 8x8 and upscaled to 96 px by the preprocessing anyway).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

SIDE = 64
PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "rocket", "brick", "grass", "gravel", "coins", "moon",
          "page", "text", "clock", "horse", "hubble_deep_field", "immunohistochemistry", "retina", "logo", "cat",
          "colorwheel")


def _uint8(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.dtype != np.uint8:
        lo, hi = float(img.min()), float(img.max())
        img = np.round((img - lo) / (hi - lo or 1.0) * 255).astype(np.uint8)
    if img.ndim == 3 and img.shape[2] == 4:
        img = img[..., :3]
    return img


def write_ood_folder(out: Path, crops_per_photo: int = 5, seed: int = 0) -> list[Path]:
    """The LFW face crops and random crops of scikit-image's photos, as 64x64 PNGs in `out/`."""
    import skimage.data as data

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = []
    for i, face in enumerate(data.lfw_subset()):
        p = out / f"lfw-{i:03d}.png"
        Image.fromarray(_uint8(face)).resize((SIDE, SIDE), Image.Resampling.BILINEAR).save(p)
        written.append(p)
    for name in PHOTOS:
        try:
            img = Image.fromarray(_uint8(getattr(data, name)()))
        except Exception as e:  # noqa: BLE001 - a sample that needs a download (pooch) is skipped
            print(f"skipped {name}: {type(e).__name__}")
            continue
        w, h = img.size
        for k in range(crops_per_photo):
            side = int(min(w, h) * rng.uniform(0.4, 1.0))
            x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
            p = out / f"{name}-{k}.png"
            img.crop((x0, y0, x0 + side, y0 + side)).resize((SIDE, SIDE), Image.Resampling.BILINEAR).save(p)
            written.append(p)
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--crops", type=int, default=5, help="Random crops per sample photo.")
    args = ap.parse_args()
    files = write_ood_folder(args.out, args.crops)
    print(f"{len(files)} out-of-distribution images in {args.out}")


if __name__ == "__main__":
    main()
