"""The training loop as plain functions (after torchvision's references/classification):
`train_one_epoch` does one pass, `fit` strings epochs together with best-checkpoint selection on
validation, early stopping, a resumable checkpoint after every epoch (pipeline.training.resume)
and DistributedDataParallel under torchrun (pipeline.training.distributed).

Images are fed channels_last on every device (oneDNN's fast layout on CPU: 1.0-1.8x faster
training steps here, see bench/RESULTS.md; cuDNN's on tensor-core GPUs); on CUDA the loop adds
mixed precision, on CPU it stays float32.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from pipeline.errors import EdgekilnError
from pipeline.training.balance import balanced_sampler
from pipeline.training.distributed import (
    DistInfo, all_finite, average_buffers, dist_info, distributed_loader, train_device, wrap_ddp,
)
from pipeline.training.optim import TrainSettings, cosine_schedule, make_optimizer, param_groups
from pipeline.training.resume import load_resume_state, rng_state, save_resume_state, set_rng_state

log = logging.getLogger("edgekiln")


class TrainingDiverged(EdgekilnError):
    pass


class TrainingInterrupted(EdgekilnError):
    """Ctrl-C during training: a resumable checkpoint was left behind."""

    exit_code = 130


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def tensor_loader(*tensors: torch.Tensor, batch_size: int, shuffle: bool, seed: int = 0,
                  balance: str = "none") -> DataLoader:
    """Batches of `tensors` (the second holds the labels); balance='sampler' draws every class
    equally often (with replacement) instead of shuffling."""
    ds = TensorDataset(*tensors)
    g = torch.Generator().manual_seed(seed)
    if shuffle and balance == "sampler":
        return DataLoader(ds, batch_size=batch_size, sampler=balanced_sampler(tensors[1], g))
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g)


def device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 128, desc: str | None = None) -> torch.Tensor:
    """Logits (on the CPU, float32) for a tensor of preprocessed images, in eval mode."""
    model.eval()
    dev = device_of(model)
    outs = []
    for i in tqdm(range(0, len(x), batch_size), desc=desc, leave=False, disable=None if desc else True):
        xb = x[i : i + batch_size].to(dev, non_blocking=True)
        if xb.ndim == 4:
            xb = xb.contiguous(memory_format=torch.channels_last)
        outs.append(model(xb).float().cpu())
    return torch.cat(outs) if outs else torch.zeros(0)


def is_multilabel(labels: torch.Tensor) -> bool:
    """Multi-hot float targets (N, classes), task multilabel; class indices (N,) otherwise."""
    return labels.ndim == 2


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy; for multi-hot targets (task multilabel) the macro mean average precision, the
    threshold-free figure that stands in for accuracy there (best epoch, early stopping, retention)."""
    if not len(labels):
        return float("nan")
    if is_multilabel(labels):
        from exporters.multilabel import mean_average_precision

        return mean_average_precision(logits.double().numpy(), labels.numpy())
    return float((logits.argmax(1) == labels).float().mean())


def macro_f1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Macro-averaged F1 over every class (scikit-learn's), the metric that weighs a rare class
    like a common one; for multi-hot targets, over the labels at probability 0.5."""
    from sklearn.metrics import f1_score

    if not len(labels):
        return float("nan")
    if is_multilabel(labels):
        return float(f1_score(labels.numpy() > 0.5, logits.numpy() >= 0, average="macro", zero_division=0))
    ids = list(range(logits.shape[1]))
    return float(f1_score(labels.numpy(), logits.argmax(1).numpy(), labels=ids, average="macro", zero_division=0))


def freeze_frozen_batchnorm(model: nn.Module) -> None:
    """Keep BatchNorm layers whose parameters are frozen in eval mode, so their running
    statistics stay frozen too (call after `model.train()`)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = [p for p in m.parameters(recurse=False)]
            if params and not any(p.requires_grad for p in params):
                m.eval()


def amp_dtype(device: torch.device, bf16_supported: bool | None = None) -> torch.dtype | None:
    """The autocast dtype for training on `device`: bfloat16 where the GPU has it (Ampere and later:
    fp32's range, so no loss scaling and no skipped steps), float16 with a GradScaler on older GPUs,
    None (full fp32) on the CPU."""
    if device.type != "cuda":
        return None
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.bfloat16 if bf16_supported else torch.float16


@dataclass
class Amp:
    """Mixed precision on CUDA only (see amp_dtype); a no-op on CPU."""

    device: torch.device

    def __post_init__(self):
        self.dtype = amp_dtype(self.device)
        self.enabled = self.dtype is not None
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None

    def autocast(self):
        return torch.autocast("cuda", dtype=self.dtype) if self.enabled else contextlib.nullcontext()


class _NonFinite(Exception):
    def __init__(self, value: float, step: int):
        self.value, self.step = value, step


def _step(loss: torch.Tensor, optimizer, params: list, grad_clip: float | None, amp: Amp) -> None:
    optimizer.zero_grad(set_to_none=True)
    if amp.scaler is not None:
        amp.scaler.scale(loss).backward()
        if grad_clip:
            amp.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        amp.scaler.step(optimizer)
        amp.scaler.update()
    else:
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    loss_fn: Callable,
    optimizer,
    scheduler=None,
    grad_clip: float | None = None,
    amp: Amp | None = None,
    info: DistInfo = DistInfo(),
) -> float:
    """One pass over `loader`; batches are (inputs, labels, *extra) and loss_fn(model_out, labels, *extra)."""
    model.train()
    freeze_frozen_batchnorm(model)
    dev = device_of(model)
    amp = amp or Amp(torch.device("cpu"))
    total, n = 0.0, 0
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for step, (x, y, *extra) in enumerate(loader):
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        extra = [e.to(dev, non_blocking=True) for e in extra]
        if x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with amp.autocast():
            out = model(x)
            out = tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()
            loss = loss_fn(out, y, *extra)
        if not all_finite(loss, info):
            raise _NonFinite(loss.item(), step)
        _step(loss, optimizer, params, grad_clip, amp)
        if scheduler is not None:
            scheduler.step()
        total += loss.item() * len(y)
        n += len(y)
    return total / max(1, n)


@dataclass
class FitResult:
    best_epoch: int
    best_val_accuracy: float
    history: list[dict] = field(default_factory=list)
    stopped_early: bool = False
    resumed_from: int | None = None


# --------------------------------------------------------------------------- fit and its pieces


@dataclass
class _Run:
    """What one `fit` call trains with, and how far it has got (the resumable part)."""

    model: nn.Module
    optimizer: Any
    scheduler: Any
    amp: Amp
    loader: DataLoader
    info: DistInfo
    checkpoint_dir: Path | None
    run_config: dict | None
    best_state: dict | None = None
    best_accuracy: float = -1.0
    best_loss: float = float("inf")  # val loss of the best epoch: breaks ties in val accuracy
    best_epoch: int = 0
    history: list[dict] = field(default_factory=list)
    bad_epochs: int = 0

    def save(self, epoch: int, finished: bool = False) -> None:
        """A resumable checkpoint of the end of `epoch` (rank 0, when there is a checkpoint dir)."""
        if self.checkpoint_dir is None or not self.info.is_main:
            return
        save_resume_state(Path(self.checkpoint_dir), self.model, self.best_state, {
            "epoch": epoch, "finished": finished,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.amp.scaler.state_dict() if self.amp.scaler is not None else None,
            "best_accuracy": self.best_accuracy, "best_loss": self.best_loss, "best_epoch": self.best_epoch,
            "history": self.history, "bad_epochs": self.bad_epochs, "rng": rng_state(self.loader),
            "config": json.loads(json.dumps(self.run_config or {}, default=str)),
        })

    def restore(self, on_epoch_start: Callable[[int], None] | None) -> tuple[int, bool]:
        """Load the checkpoint in checkpoint_dir; returns (the epoch it ended, whether training had finished)."""
        state, weights, best = load_resume_state(self.checkpoint_dir)
        self.model.load_state_dict(weights, strict=True)
        if on_epoch_start is not None:  # restore the same trainable set before the optimizer state
            on_epoch_start(state["epoch"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.amp.scaler is not None and state.get("scaler"):
            self.amp.scaler.load_state_dict(state["scaler"])
        self.best_state, self.best_accuracy, self.best_epoch = best, state["best_accuracy"], state["best_epoch"]
        self.best_loss = state.get("best_loss", float("inf"))
        self.history, self.bad_epochs = state["history"], state["bad_epochs"]
        set_rng_state(self.loader, state["rng"])
        log.info("resuming from epoch %d (%s)", state["epoch"], self.checkpoint_dir)
        return state["epoch"], bool(state.get("finished"))

    def validate(self, epoch: int, loss: float, seconds: float, eval_model: nn.Module, val_x, val_y,
                 metric: str = "accuracy") -> float:
        """Record the epoch in the history and keep the best weights by `metric` (accuracy or macro_f1);
        returns the val accuracy."""
        val_logits = predict_logits(eval_model, val_x)
        val_acc = accuracy(val_logits, val_y)
        val_loss = float((F.binary_cross_entropy_with_logits if is_multilabel(val_y) else F.cross_entropy)(
            val_logits, val_y)) if len(val_y) else float("nan")
        entry = {"epoch": epoch, "train_loss": loss, "val_loss": val_loss, "val_accuracy": val_acc,
                 "lr": self.optimizer.param_groups[0]["lr"], "seconds": seconds}
        score = val_acc
        if metric == "macro_f1":
            score = entry["val_macro_f1"] = macro_f1(val_logits, val_y)
        self.history.append(entry)
        # Better: a higher val score, or the same with a lower val loss. On a small validation split the
        # accuracy saturates (30 images: 1.0 within a few epochs) while the model still improves; without
        # the tie-break the first epoch to reach it was kept and early stopping cut the schedule short.
        # (best_accuracy holds the selection score: the val accuracy, or the macro-F1 when it selects.)
        if score > self.best_accuracy or (score == self.best_accuracy and val_loss < self.best_loss):
            self.best_accuracy, self.best_loss, self.best_epoch, self.bad_epochs = score, val_loss, epoch, 0
            self.best_state = copy.deepcopy(self.model.state_dict())
        else:
            self.bad_epochs += 1
        return val_acc


def _train_epoch(run: _Run, ddp: nn.Module, loss_fn: Callable, s: TrainSettings, epoch: int) -> tuple[float, float]:
    """(mean training loss, seconds) of one epoch; a non-finite loss stops training with the way out."""
    t0 = time.perf_counter()
    try:
        loss = train_one_epoch(ddp, run.loader, loss_fn, run.optimizer, run.scheduler, s.grad_clip, run.amp, run.info)
    except _NonFinite as e:
        where = f" ({Path(run.checkpoint_dir)})" if run.checkpoint_dir is not None else ""
        raise TrainingDiverged(
            f"loss became {e.value} at epoch {epoch}, step {e.step + 1}; training stopped. "
            f"The last good checkpoint is from epoch {epoch - 1}{where}. "
            f"Lower adapt.lr (now {s.lr:g}) or set adapt.grad_clip, then run again"
        ) from None
    return loss, time.perf_counter() - t0  # training only, validation excluded


def _epochs(run: _Run, start: int, s: TrainSettings, loss_fn: Callable, desc: str, on_epoch_start, eval_model,
            val_x, val_y) -> bool:
    """Epochs `start`..s.epochs; returns whether early stopping ended them."""
    device = device_of(run.model)
    ddp, trainable, saved = run.model, None, start - 1
    bar = tqdm(range(start, s.epochs + 1), desc=desc, unit="epoch", disable=None)
    try:
        for epoch in bar:
            if on_epoch_start is not None:
                on_epoch_start(epoch)
            if run.info.enabled:  # (re)wrap when the trainable set changes (progressive unfreezing)
                ddp, trainable = wrap_ddp(run.model, run.info, device, ddp, trainable)
                run.loader.sampler.set_epoch(epoch)
            loss, seconds = _train_epoch(run, ddp, loss_fn, s, epoch)
            average_buffers(run.model, run.info)
            if epoch % s.validate_every and epoch != s.epochs:
                continue  # (the resumable checkpoint is written at validations)
            val_acc = run.validate(epoch, loss, seconds, eval_model, val_x, val_y, s.select_metric)
            bar.set_postfix(loss=f"{loss:.3f}", val_acc=f"{val_acc:.3f}", best=f"{run.best_accuracy:.3f}")
            stopped_early = s.patience is not None and run.bad_epochs >= s.patience and epoch < s.epochs
            run.save(epoch, finished=stopped_early or epoch == s.epochs)
            saved = epoch
            if stopped_early:
                log.info("early stopping at epoch %d: no better val accuracy (or val loss at the same accuracy) "
                         "in %d validations", epoch, s.patience)
                return True
    except KeyboardInterrupt:
        if run.checkpoint_dir is None:
            raise
        raise TrainingInterrupted(
            f"interrupted in epoch {saved + 1}; a resumable checkpoint (epoch {saved}) is in {Path(run.checkpoint_dir)}. "
            "Continue with: edgekiln adapt CONFIG --resume"
        ) from None
    return False


def fit(
    model: nn.Module,
    train_loader: DataLoader,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    loss_fn: Callable | None = None,
    epochs: int | None = None,
    lr: float | None = None,
    weight_decay: float = 1e-4,
    desc: str = "train",
    warmup_epochs: float = 0.0,
    *,
    settings: TrainSettings | None = None,
    groups: list[dict] | None = None,
    on_epoch_start: Callable[[int], None] | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    run_config: dict | None = None,
    eval_model: nn.Module | None = None,
) -> FitResult:
    """Train `model`; keep (and restore) the weights of the best validation epoch.

    loss_fn(model_out, labels, *extra): default cross-entropy with `settings.label_smoothing`.
    settings: optimizer, schedule, label smoothing, clipping, early stopping (or the
        plain epochs/lr/weight_decay/warmup_epochs arguments, AdamW).
    groups: optimizer param groups (see `param_groups`); default: every trainable parameter.
    on_epoch_start(epoch): called before each epoch, e.g. to unfreeze another block group.
    checkpoint_dir: a resumable checkpoint is written there after every epoch (rank 0).
    resume: continue from the checkpoint in `checkpoint_dir`.
    eval_model: what validation runs (default `model`), e.g. the student inside a training wrapper.
    """
    s = settings or TrainSettings(epochs=epochs, lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs)
    info = dist_info()
    device = train_device(info)
    home = device_of(model)  # where the caller keeps it: the trained model goes back there
    model.to(device)
    model.to(memory_format=torch.channels_last)
    if groups is None:
        groups = param_groups([([p for p in model.parameters() if p.requires_grad], 1.0)], s.weight_decay)
    optimizer = make_optimizer(s.optimizer, groups, s.lr, s.weight_decay, s.momentum)
    train_loader = distributed_loader(train_loader, info)
    scheduler = cosine_schedule(optimizer, s.epochs, len(train_loader), s.warmup_epochs)
    if loss_fn is None and is_multilabel(val_y):
        loss_fn = F.binary_cross_entropy_with_logits  # one sigmoid per label (task multilabel)
    if loss_fn is None:
        weight = torch.tensor(s.class_weights, device=device) if s.class_weights else None
        loss_fn = functools.partial(F.cross_entropy, label_smoothing=s.label_smoothing, weight=weight)
    run = _Run(model, optimizer, scheduler, Amp(device), train_loader, info, checkpoint_dir, run_config)
    start, resumed_from = 1, None
    if resume:
        ended, finished = run.restore(on_epoch_start)
        start = resumed_from = ended + 1
        if finished:
            start = s.epochs + 1
    else:
        run.save(0)
    stopped_early = _epochs(run, start, s, loss_fn, desc, on_epoch_start, eval_model or model, val_x, val_y)
    if run.best_state is not None:
        model.load_state_dict(run.best_state)
    model.to(home).eval()
    # The val accuracy of the kept epoch (run.best_accuracy is the selection score: macro-F1 when it selects).
    best_acc = next((h["val_accuracy"] for h in run.history if h["epoch"] == run.best_epoch), run.best_accuracy)
    return FitResult(best_epoch=run.best_epoch, best_val_accuracy=best_acc, history=run.history,
                     stopped_early=stopped_early, resumed_from=resumed_from)
