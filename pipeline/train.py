"""The training loop as plain functions (after torchvision's references/classification).

No trainer object: `train_one_epoch` and `evaluate` do one thing each, and
`fit` strings them together with best-checkpoint selection on validation.
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from pipeline.errors import EdgekilnError


class TrainingDiverged(EdgekilnError):
    pass


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def tensor_loader(*tensors: torch.Tensor, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size, shuffle=shuffle, generator=g)


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 128, desc: str | None = None) -> torch.Tensor:
    """Logits for a tensor of preprocessed images, in eval mode."""
    model.eval()
    outs = []
    for i in tqdm(range(0, len(x), batch_size), desc=desc, leave=False, disable=None if desc else True):
        outs.append(model(x[i : i + batch_size]))
    return torch.cat(outs) if outs else torch.zeros(0)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean()) if len(labels) else float("nan")


def kd_loss(student_logits, teacher_logits, labels, temperature: float, alpha: float) -> torch.Tensor:
    """Hinton et al. 2015: alpha * T^2 * KL(p_T(teacher) || p_T(student)) + (1 - alpha) * CE."""
    t = temperature
    kl = F.kl_div(
        F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1), reduction="batchmean", log_target=True
    )
    return alpha * (t * t) * kl + (1.0 - alpha) * F.cross_entropy(student_logits, labels)


@dataclass
class FitResult:
    best_epoch: int
    best_val_accuracy: float
    history: list[dict] = field(default_factory=list)


def cosine_schedule(optimizer, epochs: int, steps_per_epoch: int, warmup_epochs: float = 0.0):
    total = max(1, epochs * steps_per_epoch)
    warm = int(warmup_epochs * steps_per_epoch)

    def f(step):
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, f)


def train_one_epoch(model: nn.Module, loader: DataLoader, loss_fn: Callable, optimizer, scheduler=None) -> float:
    """One pass over `loader`; batches are (inputs, labels, *extra) and loss_fn(model_out, labels, *extra)."""
    model.train()
    total, n = 0.0, 0
    for x, y, *extra in loader:
        out = model(x)
        loss = loss_fn(out, y, *extra)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"loss became {loss.item()} — lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total += loss.item() * len(y)
        n += len(y)
    return total / max(1, n)


def fit(
    model: nn.Module,
    train_loader: DataLoader,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    loss_fn: Callable,
    epochs: int,
    lr: float,
    weight_decay: float,
    desc: str,
    warmup_epochs: float = 0.0,
    eval_model: nn.Module | None = None,
) -> FitResult:
    """Train with AdamW + cosine schedule; keep (and restore) the weights of the best validation epoch.

    eval_model: what validation runs (default `model`), e.g. the student inside a training wrapper.
    """
    eval_model = eval_model or model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = cosine_schedule(optimizer, epochs, len(train_loader), warmup_epochs)
    best_state, best_acc, best_epoch, history = None, -1.0, 0, []
    bar = tqdm(range(1, epochs + 1), desc=desc, unit="epoch", disable=None)
    for epoch in bar:
        t0 = time.perf_counter()
        loss = train_one_epoch(model, train_loader, loss_fn, optimizer, scheduler)
        seconds = time.perf_counter() - t0
        val_acc = accuracy(predict_logits(eval_model, val_x), val_y)
        history.append({"epoch": epoch, "train_loss": loss, "val_accuracy": val_acc, "seconds": seconds})
        if val_acc > best_acc:
            best_acc, best_epoch = val_acc, epoch
            best_state = copy.deepcopy(model.state_dict())
        bar.set_postfix(loss=f"{loss:.3f}", val_acc=f"{val_acc:.3f}", best=f"{best_acc:.3f}")
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return FitResult(best_epoch=best_epoch, best_val_accuracy=best_acc, history=history)
