"""The training loop as plain functions (after torchvision's references/classification).

No trainer object: `train_one_epoch` and `evaluate` do one thing each, and
`fit` strings them together with best-checkpoint selection on validation,
early stopping, a resumable checkpoint after every epoch, and
DistributedDataParallel when launched by `torchrun`:

    torchrun --nproc_per_node 2 -m pipeline.cli adapt my.yaml   # gloo on CPU, NCCL on GPUs

Optimizers are chosen by name (`OPTIMIZERS`); the schedule is cosine with a
linear warm-up. Images are fed channels_last on every device (oneDNN's fast
layout on CPU: 1.0-1.8x faster training steps here, see bench/RESULTS.md; cuDNN's
on tensor-core GPUs); on CUDA the loop adds mixed precision, on CPU it stays float32.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from pipeline.errors import ConfigError, EdgekilnError

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


def tensor_loader(*tensors: torch.Tensor, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size, shuffle=shuffle, generator=g)


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 128, desc: str | None = None) -> torch.Tensor:
    """Logits (on the CPU, float32) for a tensor of preprocessed images, in eval mode."""
    model.eval()
    dev = _device_of(model)
    outs = []
    for i in tqdm(range(0, len(x), batch_size), desc=desc, leave=False, disable=None if desc else True):
        xb = x[i : i + batch_size].to(dev, non_blocking=True)
        if xb.ndim == 4:
            xb = xb.contiguous(memory_format=torch.channels_last)
        outs.append(model(xb).float().cpu())
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


# --------------------------------------------------------------------------- optimizers and schedules


def _adamw(groups, lr, weight_decay, momentum):
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def _sgd(groups, lr, weight_decay, momentum):
    return torch.optim.SGD(groups, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=momentum > 0)


OPTIMIZERS: dict[str, Callable] = {"adamw": _adamw, "sgd": _sgd}


def param_groups(groups: Iterable[tuple[list[nn.Parameter], float]], weight_decay: float) -> list[dict]:
    """Optimizer param groups from (params, lr_scale) pairs. Biases and norm weights (1-D) get no weight decay."""
    out = []
    for params, scale in groups:
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        for ps, wd in ((decay, weight_decay), (no_decay, 0.0)):
            if ps:
                out.append({"params": ps, "lr_scale": scale, "weight_decay": wd})
    return out


def make_optimizer(name: str, groups: list[dict], lr: float, weight_decay: float, momentum: float = 0.9):
    """Build an optimizer by name; each group's lr is lr * its 'lr_scale'."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer '{name}'; valid: {', '.join(OPTIMIZERS)}")
    for g in groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    return OPTIMIZERS[name](groups, lr, weight_decay, momentum)


def cosine_schedule(optimizer, epochs: int, steps_per_epoch: int, warmup_epochs: float = 0.0):
    total = max(1, epochs * steps_per_epoch)
    warm = int(warmup_epochs * steps_per_epoch)

    def f(step):
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, f)


@dataclass(frozen=True)
class TrainSettings:
    """The optimisation settings a training loop needs (a narrow piece of the config)."""

    epochs: int
    lr: float
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    momentum: float = 0.9
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    patience: int | None = None

    @classmethod
    def from_adapt(cls, a) -> "TrainSettings":
        return cls(**{f: getattr(a, f) for f in cls.__dataclass_fields__})


# --------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): NCCL on GPUs, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local)


def dist_info() -> DistInfo:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo()


def train_device(info: DistInfo | None = None) -> torch.device:
    info = info or dist_info()
    return torch.device("cuda", info.local_rank) if torch.cuda.is_available() else torch.device("cpu")


# --------------------------------------------------------------------------- the loop


def freeze_frozen_batchnorm(model: nn.Module) -> None:
    """Keep BatchNorm layers whose parameters are frozen in eval mode, so their running
    statistics stay frozen too (call after `model.train()`)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = [p for p in m.parameters(recurse=False)]
            if params and not any(p.requires_grad for p in params):
                m.eval()


@dataclass
class _Amp:
    """Mixed precision on CUDA only; a no-op on CPU."""

    device: torch.device

    def __post_init__(self):
        self.enabled = self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if self.enabled else None

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.float16) if self.enabled else contextlib.nullcontext()


def _all_finite(loss: torch.Tensor, info: DistInfo) -> bool:
    ok = torch.isfinite(loss.detach()).all()
    if info.enabled:  # every rank must stop together, or the others hang in all-reduce
        import torch.distributed as dist

        flag = ok.float().reshape(1).to(loss.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        ok = flag.item() > 0
    return bool(ok)


def _average_buffers(model: nn.Module, info: DistInfo) -> None:
    """DDP syncs parameters, and broadcasts buffers only at the start of each forward: average the
    BatchNorm running statistics over the ranks after an epoch so every rank holds the same model."""
    if not info.enabled:
        return
    import torch.distributed as dist

    for b in model.buffers():
        if b.is_floating_point():
            dist.all_reduce(b, op=dist.ReduceOp.SUM)
            b.div_(info.world_size)


class _NonFinite(Exception):
    def __init__(self, value: float, step: int):
        self.value, self.step = value, step


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    loss_fn: Callable,
    optimizer,
    scheduler=None,
    grad_clip: float | None = None,
    amp: _Amp | None = None,
    info: DistInfo = DistInfo(),
) -> float:
    """One pass over `loader`; batches are (inputs, labels, *extra) and loss_fn(model_out, labels, *extra)."""
    model.train()
    freeze_frozen_batchnorm(model)
    dev = _device_of(model)
    amp = amp or _Amp(torch.device("cpu"))
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
        if not _all_finite(loss, info):
            raise _NonFinite(loss.item(), step)
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


# ------------------------------------------------------------- resumable checkpoints

STATE_FILE = "state.pt"


def _save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp))
    os.replace(tmp, path)


def save_resume_state(ckpt_dir: Path, model: nn.Module, best_state: dict | None, state: dict) -> None:
    """Weights as safetensors, optimizer/scheduler/epoch/config as a small .pt, written so that
    state.pt (written last, atomically) always names complete weight files."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    epoch = state["epoch"]
    weights = f"model-epoch{epoch:04d}.safetensors"
    _save_weights(model.state_dict(), ckpt_dir / weights)
    state = {**state, "weights": weights, "best_weights": None}
    if best_state is not None:
        best = f"best-epoch{state['best_epoch']:04d}.safetensors"
        if not (ckpt_dir / best).is_file():
            _save_weights(best_state, ckpt_dir / best)
        state["best_weights"] = best
    tmp = ckpt_dir / f".{STATE_FILE}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, ckpt_dir / STATE_FILE)
    keep = {weights, state["best_weights"]}
    for p in ckpt_dir.glob("*.safetensors"):
        if p.name not in keep:
            p.unlink(missing_ok=True)


def load_resume_state(ckpt_dir: Path) -> tuple[dict, dict, dict | None]:
    """(state, model weights, best weights) of a resumable checkpoint."""
    from safetensors.torch import load_file

    path = Path(ckpt_dir) / STATE_FILE
    if not path.is_file():
        raise EdgekilnError(f"no resumable checkpoint in {ckpt_dir}; run without --resume to start training")
    state = torch.load(path, map_location="cpu", weights_only=False)
    weights = load_file(str(Path(ckpt_dir) / state["weights"]))
    best = load_file(str(Path(ckpt_dir) / state["best_weights"])) if state.get("best_weights") else None
    return state, weights, best


def _rng_state(loader: DataLoader) -> dict:
    g = getattr(loader, "generator", None)
    return {"torch": torch.get_rng_state(), "loader": g.get_state() if g is not None else None}


def _set_rng_state(loader: DataLoader, s: dict) -> None:
    torch.set_rng_state(s["torch"])
    g = getattr(loader, "generator", None)
    if g is not None and s.get("loader") is not None:
        g.set_state(s["loader"])


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
    eval_model = eval_model or model
    s = settings or TrainSettings(epochs=epochs, lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs)
    info = dist_info()
    device = train_device(info)
    home = _device_of(model)  # where the caller keeps it: the trained model goes back there
    model.to(device)
    model.to(memory_format=torch.channels_last)
    amp = _Amp(device)
    if groups is None:
        groups = param_groups([([p for p in model.parameters() if p.requires_grad], 1.0)], s.weight_decay)
    optimizer = make_optimizer(s.optimizer, groups, s.lr, s.weight_decay, s.momentum)
    if info.enabled:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(train_loader.dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True)
        train_loader = DataLoader(train_loader.dataset, batch_size=train_loader.batch_size, sampler=sampler)
    scheduler = cosine_schedule(optimizer, s.epochs, len(train_loader), s.warmup_epochs)
    if loss_fn is None:
        loss_fn = functools.partial(F.cross_entropy, label_smoothing=s.label_smoothing)
    best_state, best_acc, best_epoch, history, bad_epochs, start = None, -1.0, 0, [], 0, 1
    resumed_from = None
    if resume:
        state, weights, best = load_resume_state(checkpoint_dir)
        model.load_state_dict(weights, strict=True)
        if on_epoch_start is not None:  # restore the same trainable set before the optimizer state
            on_epoch_start(state["epoch"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if amp.scaler is not None and state.get("scaler"):
            amp.scaler.load_state_dict(state["scaler"])
        best_state, best_acc, best_epoch = best, state["best_accuracy"], state["best_epoch"]
        history, bad_epochs = state["history"], state["bad_epochs"]
        _set_rng_state(train_loader, state["rng"])
        start = resumed_from = state["epoch"] + 1
        if state.get("finished"):
            start = s.epochs + 1
        log.info("resuming from epoch %d (%s)", state["epoch"], checkpoint_dir)

    def checkpoint(epoch: int, finished: bool = False) -> None:
        if checkpoint_dir is None or not info.is_main:
            return
        save_resume_state(
            Path(checkpoint_dir),
            model,
            best_state,
            {
                "epoch": epoch,
                "finished": finished,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": amp.scaler.state_dict() if amp.scaler is not None else None,
                "best_accuracy": best_acc,
                "best_epoch": best_epoch,
                "history": history,
                "bad_epochs": bad_epochs,
                "rng": _rng_state(train_loader),
                "config": json.loads(json.dumps(run_config or {}, default=str)),
            },
        )

    saved = start - 1
    if not resume:
        checkpoint(0)
    trainable = None
    ddp = model
    stopped_early = False
    bar = tqdm(range(start, s.epochs + 1), desc=desc, unit="epoch", disable=None)
    epoch = start - 1
    try:
        for epoch in bar:
            if on_epoch_start is not None:
                on_epoch_start(epoch)
            if info.enabled:  # (re)wrap when the trainable set changes (progressive unfreezing)
                now = tuple(p.requires_grad for p in model.parameters())
                if now != trainable:
                    from torch.nn.parallel import DistributedDataParallel

                    ddp = DistributedDataParallel(model, device_ids=[info.local_rank] if device.type == "cuda" else None)
                    trainable = now
                train_loader.sampler.set_epoch(epoch)
            t0 = time.perf_counter()
            try:
                loss = train_one_epoch(ddp, train_loader, loss_fn, optimizer, scheduler, s.grad_clip, amp, info)
            except _NonFinite as e:
                last = epoch - 1
                where = f" ({Path(checkpoint_dir)})" if checkpoint_dir is not None else ""
                raise TrainingDiverged(
                    f"loss became {e.value} at epoch {epoch}, step {e.step + 1}; training stopped. "
                    f"The last good checkpoint is from epoch {last}{where}. "
                    f"Lower adapt.lr (now {s.lr:g}) or set adapt.grad_clip, then run again"
                ) from None
            seconds = time.perf_counter() - t0  # training only, validation excluded
            _average_buffers(model, info)
            val_logits = predict_logits(eval_model, val_x)
            val_acc = accuracy(val_logits, val_y)
            val_loss = float(F.cross_entropy(val_logits, val_y)) if len(val_y) else float("nan")
            history.append({
                "epoch": epoch, "train_loss": loss, "val_loss": val_loss, "val_accuracy": val_acc,
                "lr": optimizer.param_groups[0]["lr"], "seconds": seconds,
            })
            if val_acc > best_acc:
                best_acc, best_epoch, bad_epochs = val_acc, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                bad_epochs += 1
            bar.set_postfix(loss=f"{loss:.3f}", val_acc=f"{val_acc:.3f}", best=f"{best_acc:.3f}")
            stopped_early = s.patience is not None and bad_epochs >= s.patience and epoch < s.epochs
            checkpoint(epoch, finished=stopped_early or epoch == s.epochs)
            saved = epoch
            if stopped_early:
                log.info("early stopping at epoch %d: no better val accuracy for %d epochs", epoch, s.patience)
                break
    except KeyboardInterrupt:
        where = Path(checkpoint_dir) if checkpoint_dir is not None else None
        if where is None:
            raise
        raise TrainingInterrupted(
            f"interrupted in epoch {saved + 1}; a resumable checkpoint (epoch {saved}) is in {where}. "
            "Continue with: edgekiln adapt CONFIG --resume"
        ) from None
    if best_state is not None:
        model.load_state_dict(best_state)
    model.to(home).eval()
    return FitResult(
        best_epoch=best_epoch, best_val_accuracy=best_acc, history=history, stopped_early=stopped_early, resumed_from=resumed_from
    )
