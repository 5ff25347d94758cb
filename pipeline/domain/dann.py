"""`adapt.domain: dann` (Ganin & Lempitsky 2015, "Unsupervised Domain Adaptation by
Backpropagation"): while the network fine-tunes on labeled source images, a small domain
classifier learns to tell source features from target features through a gradient-reversal
layer, so the backbone learns features the domain classifier cannot separate. The domain
classifier lives only in the training wrapper; the model that comes out is the plain network."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class GradReverse(torch.autograd.Function):
    """Identity forward; the gradient times -lambda backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lam: float) -> torch.Tensor:
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.lam * grad, None


def grad_reverse(x: torch.Tensor, lam: float) -> torch.Tensor:
    return GradReverse.apply(x, lam)


def grl_lambda(progress: float, gamma: float = 10.0) -> float:
    """Ganin & Lempitsky's schedule 2 / (1 + exp(-gamma p)) - 1: 0 at the start, near 1 at the end."""
    return 2.0 / (1.0 + math.exp(-gamma * min(max(progress, 0.0), 1.0))) - 1.0


class DannWrapper(nn.Module):
    """model + domain classifier; forward returns (class logits, domain logits). `total_steps` sets
    the lambda schedule (one step per training forward)."""

    def __init__(self, model: nn.Module, total_steps: int, hidden: int = 256):
        super().__init__()
        self.model = model
        d = model.num_features
        self.domain_head = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(hidden, 1))
        self.total_steps = max(1, total_steps)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    @property
    def lam(self) -> float:
        return grl_lambda(float(self.step) / self.total_steps)

    def forward(self, x: torch.Tensor):
        f = self.model.forward_features(x)
        logits = self.model.head(f)
        if not self.training:
            return logits
        lam = self.lam
        self.step += 1
        return logits, self.domain_head(grad_reverse(f, lam)).squeeze(1)


def dann_loss(out, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on the labeled (source) rows + binary domain loss on every row (label -1 = target)."""
    logits, dom = out
    src = y >= 0
    ce = F.cross_entropy(logits[src], y[src]) if src.any() else logits.sum() * 0
    return ce + F.binary_cross_entropy_with_logits(dom, (~src).float())
