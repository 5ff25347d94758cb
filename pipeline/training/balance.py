"""data.balance: the class weights of the loss ('weights'), the balanced sampler ('sampler'), and the
shift of the trained head's bias towards the rare classes that both apply at the end of adapt."""

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


def _class_counts(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Training images per class (float); unlabeled rows (-1) are not counted."""
    y = torch.as_tensor(labels).long()
    return torch.bincount(y[y >= 0], minlength=num_classes).float()


def class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse class frequency, w_c = n / (num_classes * n_c) (scikit-learn's 'balanced'): every class
    weighs as much in total, and the weights average 1 over the training images when every class has
    some. A class with no training image gets 0. Unlabeled rows (-1) are not counted."""
    counts = _class_counts(labels, num_classes)
    return torch.where(counts > 0, counts.sum() / (num_classes * counts.clamp(min=1)), torch.zeros_like(counts))


def row_weights(labels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Each row's class weight; 1 for an unlabeled row (-1), the average weight of a training image."""
    w = torch.ones(len(labels), dtype=weight.dtype, device=weight.device)
    known = labels >= 0
    w[known] = weight[labels[known]]
    return w


# tau of the post-hoc logit shift that data.balance 'weights' and 'sampler' add to the adapted head. Re-weighting
# alone fades once a head separates its training images (Byrd & Lipton 2019): on the 10:1 digits bench the
# weighted head gained ~4 macro-F1 points, a quarter of the logit adjustment (Menon et al. 2021; tau 1 aims at
# the balanced error) on top gives ~6 on a balanced test split and stays above `none` on a 10:1 one (tau 1
# loses 5-18 points there). 0.25 was picked on seeds 0-4 and checked on seeds 5-9 (bench/RESULTS.md).
PRIOR_SHIFT_TAU = 0.25


def prior_shift(labels: torch.Tensor, num_classes: int, tau: float = PRIOR_SHIFT_TAU) -> torch.Tensor:
    """The per-class logit shift -tau * log(training share of the class), centred so the mean shift is 0
    (softmax ignores a common offset; centring keeps the logits' scale for the energy score). A class
    with no training image gets the rarest class's shift. Unlabeled rows (-1) are not counted."""
    counts = _class_counts(labels, num_classes)
    if counts.sum() == 0:
        return torch.zeros(num_classes)
    share = counts.clamp(min=counts[counts > 0].min()) / counts.sum()
    shift = -tau * share.log()
    return shift - shift.mean()
