"""Procedurally generated images of no class, for the KD term (distill.synthetic_outliers).

    images = synthetic_images(300, seed=0)   # list of PIL RGB images, the same for the same seed
    x = synthetic_tensors(200, spec, seed=0, stream=1)   # through the evaluation transform: (200, 3, H, W)

A student distilled from scratch on a few hundred photos learns nothing about what its classes are not:
on the textures photo set (bench/photo_sets.py) the shipped student answered "brick", "grass" or "gravel"
to 52 % of real face and scene photos (energy AUROC 0.59), where its ImageNet-pretrained teacher
rejected all of them (AUROC 1.00). Fed to the KD term as unlabeled images, images of no class teach
the student the teacher's answer off the data; no outlier data set is needed, nor a download.

Two families, both known to carry natural-image statistics (Baradad et al. 2021, "Learning to See by
Looking at Noise", https://arxiv.org/abs/2106.05963): dead leaves (occluding discs and rectangles,
power-law sizes, random colours) and spectral noise (1/f^a amplitude per channel, a in [1, 2.5]).
Hand-written: no maintained library generates them, and they are twenty lines of numpy and PIL.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

SIZE = 160  # generated at this side; the preprocessing's resize and crop take them to the model's input


def dead_leaves(rng: np.random.Generator, size: int = SIZE) -> Image.Image:
    img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(60, 300))):
        r = float(np.clip((rng.pareto(2.0) + 1) * 3, 2, size / 2))
        x, y = rng.uniform(-r, size + r, 2)
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
        else:
            draw.rectangle([x - r, y - r * rng.uniform(0.3, 1.0), x + r, y + r], fill=colour)
    return img


def spectral_noise(rng: np.random.Generator, size: int = SIZE) -> Image.Image:
    a = rng.uniform(1.0, 2.5)
    f2 = np.fft.fftfreq(size)[:, None] ** 2 + np.fft.fftfreq(size)[None, :] ** 2
    f2[0, 0] = 1.0
    channels = []
    for _ in range(3):
        spectrum = (rng.normal(size=(size, size)) + 1j * rng.normal(size=(size, size))) / f2 ** (a / 2)
        x = np.real(np.fft.ifft2(spectrum))
        channels.append((x - x.min()) / (np.ptp(x) + 1e-9))
    return Image.fromarray((np.stack(channels, -1) * 255).astype(np.uint8))


def synthetic_images(n: int, seed: int = 0, size: int = SIZE, stream: int = 0) -> list[Image.Image]:
    """`n` images, dead leaves and spectral noise alternating, deterministic for `seed`; another
    `stream` gives other images of the same families (the export's check draws from stream 1, the
    student trains on stream 0)."""
    rng = np.random.default_rng([seed, 0x5EED] + ([stream] if stream else []))
    return [(dead_leaves if i % 2 == 0 else spectral_noise)(rng, size) for i in range(n)]


def synthetic_tensors(n: int, spec, seed: int = 0, stream: int = 0):
    """`n` generated images through the evaluation transform (pipeline.data.eval_transform), a float tensor."""
    import torch

    from pipeline.data import eval_transform

    tf = eval_transform(spec)
    return torch.stack([tf(img) for img in synthetic_images(n, seed, stream=stream)])
