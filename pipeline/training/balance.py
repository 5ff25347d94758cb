"""data.balance: the class weights of the loss ('weights') and the balanced sampler ('sampler')."""

from __future__ import annotations

import torch


def balanced_sampler(labels: torch.Tensor, generator: torch.Generator):
    """torch's WeightedRandomSampler with weight 1/count(class) per image (unlabeled rows, -1, count as
    one more class): one epoch draws as many images as there are, every class equally likely."""
    from torch.utils.data import WeightedRandomSampler

    y = torch.as_tensor(labels).long()
    shifted = y + 1  # -1 (unlabeled) -> 0
    counts = torch.bincount(shifted).float()
    return WeightedRandomSampler((1.0 / counts[shifted]).double(), num_samples=len(y), replacement=True,
                                generator=generator)


def class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse class frequency, w_c = n / (num_classes * n_c) (scikit-learn's 'balanced'): every class
    weighs as much in total, and the weights average 1 over the training images when every class has
    some. A class with no training image gets 0. Unlabeled rows (-1) are not counted."""
    y = torch.as_tensor(labels).long()
    counts = torch.bincount(y[y >= 0], minlength=num_classes).float()
    return torch.where(counts > 0, counts.sum() / (num_classes * counts.clamp(min=1)), torch.zeros_like(counts))


def row_weights(labels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Each row's class weight; 1 for an unlabeled row (-1), the average weight of a training image."""
    w = torch.ones(len(labels), dtype=weight.dtype, device=weight.device)
    known = labels >= 0
    w[known] = weight[labels[known]]
    return w
