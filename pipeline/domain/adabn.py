"""`adapt.domain: adabn` (Li et al. 2016, "Revisiting Batch Normalization for Practical Domain
Adaptation"): every BatchNorm layer's running mean and variance re-estimated on target images. The
weights stay as trained, and the model is still a plain network with plain BatchNorm for export."""

from __future__ import annotations

import torch
from torch import nn


def bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def adapt_batchnorm(model: nn.Module, x_target: torch.Tensor, batch_size: int = 64) -> int:
    """Replace every BatchNorm's running statistics with those of `x_target` (preprocessed images);
    returns the number of BatchNorm layers re-estimated. Only BN buffers change."""
    layers = bn_layers(model)
    saved = [(m, m.momentum) for m in layers]
    was_training = model.training
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over every batch, not an exponential one
        m.train()
    try:
        for i in range(0, len(x_target), batch_size):
            model(x_target[i : i + batch_size].contiguous(memory_format=torch.channels_last))
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.train(was_training)
    return len(layers)
