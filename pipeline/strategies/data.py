"""The images, labels and backbone features a strategy trains on, and train-time augmentation."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from pipeline.data import Split, eval_transform, label_tensor, load_tensors
from pipeline.errors import ConfigError
from pipeline.features import cached_features
from pipeline.training import balanced_sampler, tensor_loader
from runtime.preprocess import PreprocessSpec, open_image


def load_uint8(paths: list[Path], spec: PreprocessSpec) -> torch.Tensor:
    """Images after the evaluation transform's resize and crop, still uint8 (for augmentation)."""
    return uint8_crops((open_image(p) for p in paths), len(paths), spec)


def uint8_crops(images, n: int, spec: PreprocessSpec) -> torch.Tensor:
    """`n` RGB PIL images (an iterable) through the evaluation transform's resize and crop, as uint8 (N, 3, H, W)."""
    geometry = v2.Compose(eval_transform(spec).transforms[:3])  # Resize, CenterCrop, PILToTensor
    x = torch.empty((n, 3, *spec.hw), dtype=torch.uint8)
    for i, img in enumerate(images):
        x[i] = geometry(img)
    return x


class AdaptData:
    """The split's images, labels and backbone features, each loaded once when first asked for."""

    PARTS = ("train", "val", "test")

    def __init__(self, paths: dict[str, list[Path]], labels: dict[str, list[int]], spec: PreprocessSpec, class_names: list[str]):
        self.paths, self._labels, self.spec, self.class_names = paths, labels, spec, class_names
        self._memo: dict[tuple, torch.Tensor] = {}

    @classmethod
    def from_split(cls, split: Split, spec: PreprocessSpec) -> "AdaptData":
        return cls(
            {p: split.paths(p) for p in cls.PARTS}, {p: split.labels(p) for p in cls.PARTS}, spec, split.class_names
        )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def labels(self, part: str) -> list[int]:
        return self._labels[part]

    def y(self, part: str) -> torch.Tensor:
        return label_tensor(self._labels[part])

    def x(self, part: str) -> torch.Tensor:
        """Preprocessed float images (the evaluation transform)."""
        if ("x", part) not in self._memo:
            self._memo["x", part] = load_tensors(self.paths[part], self._labels[part], self.spec, desc=f"loading {part} images")[0]
        return self._memo["x", part]

    def x_uint8(self, part: str) -> torch.Tensor:
        if ("u8", part) not in self._memo:
            self._memo["u8", part] = load_uint8(self.paths[part], self.spec)
        return self._memo["u8", part]

    def features(self, part: str, backbone: nn.Module, arch: str, digest: str, use_cache: bool = True) -> torch.Tensor:
        """Frozen-backbone features, from the on-disk cache when possible."""
        key = ("f", part, digest)
        if key not in self._memo:
            self._memo[key] = cached_features(
                backbone, arch, self.paths[part], self._labels[part], self.spec,
                images=self._memo.get(("x", part)), weights=digest, use_cache=use_cache, desc=f"{part} features",
            )
        return self._memo[key]

    def subset(self, part: str, idx: list[int]) -> "AdaptData":
        """The same data with only `idx` of `part` (the other parts, and everything loaded, shared)."""
        sub = AdaptData(
            {**self.paths, part: [self.paths[part][i] for i in idx]},
            {**self._labels, part: [self._labels[part][i] for i in idx]},
            self.spec,
            self.class_names,
        )
        ids = torch.tensor(idx, dtype=torch.long)
        for key, t in self._memo.items():
            sub._memo[key] = t[ids] if key[1] == part else t
        return sub


AUGMENTATIONS = ("none", "light", "strong")


def train_transform(preset: str, spec: PreprocessSpec) -> v2.Compose:
    """Train-time augmentation (torchvision transforms v2) on uint8 crops, then the evaluation
    transform's ToDtype + Normalize. Evaluation never augments."""
    if preset not in AUGMENTATIONS:
        raise ConfigError(f"unknown augmentation preset '{preset}'; valid: {', '.join(AUGMENTATIONS)}")
    size = spec.hw  # RandomResizedCrop to the (H, W) input
    aug: list = []
    if preset == "light":
        aug = [v2.RandomResizedCrop(size, scale=(0.8, 1.0), antialias=True), v2.RandomHorizontalFlip()]
    elif preset == "strong":
        aug = [
            v2.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3),
        ]
    tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(spec.mean), list(spec.std))]
    if preset == "strong":
        tail.append(v2.RandomErasing(p=0.25))
    return v2.Compose(aug + tail)


class AugmentedImages(Dataset):
    def __init__(self, x_uint8: torch.Tensor, y: torch.Tensor, transform):
        self.x, self.y, self.transform = x_uint8, y, transform

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.transform(self.x[i]), self.y[i]


def train_loader(data: AdaptData, augment: str, batch_size: int, seed: int, num_workers: int = 0,
                 balance: str = "none") -> DataLoader:
    """Shuffled (seeded) training batches: preprocessed tensors, or uint8 crops through an augmentation
    preset; balance='sampler' draws every class equally often instead."""
    if augment == "none":
        return tensor_loader(data.x("train"), data.y("train"), batch_size=batch_size, shuffle=True, seed=seed,
                             balance=balance)
    ds = AugmentedImages(data.x_uint8("train"), data.y("train"), train_transform(augment, data.spec))
    g = torch.Generator().manual_seed(seed)
    if balance == "sampler":
        return DataLoader(ds, batch_size=batch_size, sampler=balanced_sampler(data.y("train"), g),
                          num_workers=num_workers)
    return DataLoader(ds, batch_size=batch_size, shuffle=True, generator=g, num_workers=num_workers)
