"""Distillation: Hinton KD with an optional feature (hint) loss, teacher-logit
caching, a no-KD control run, on-machine ONNX cost measurement and automatic
student choice under latency/size budgets."""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

from pipeline.errors import EdgekilnError
from pipeline.models import EdgeClassifier, count_params, create_model
from pipeline.training import (
    FitResult, TrainSettings, balanced_sampler, class_weights, dist_info, fit, kd_loss, set_seed, tensor_loader,
)
from runtime.preprocess import Size, size_hw

# Candidate students for `--student auto`, smallest first.
STUDENTS = (
    "compact_cnn_w0.5",
    "compact_cnn_w1.0",
    "torchvision/shufflenet_v2_x0_5",
    "torchvision/mobilenet_v3_small",
    "torchvision/resnet18",
    "efficientnet_lite0",
    "torchvision/mobilenet_v3_large",
)


def reset_bn_momentum(model: nn.Module, momentum: float = 0.1) -> None:
    # torchvision's MobileNetV3 uses BN momentum 0.01, tuned for long ImageNet
    # schedules; in a few hundred steps from scratch its running statistics do
    # not converge and eval-mode accuracy collapses to chance. 0.1 is PyTorch's default.
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum


def build_student(name: str, num_classes: int, weights: str, input_size: Size | None = None) -> EdgeClassifier:
    """The student, built for the teacher's input size (refused in one line when it cannot take it)."""
    from pipeline.models import check_runs

    student = create_model(name, num_classes, weights, input_size=input_size)
    if input_size is not None:
        check_runs(student, input_size)
    if weights == "none":
        reset_bn_momentum(student)
    return student


class HintedStudent(nn.Module):
    """Student plus a learned projection of its penultimate features onto the teacher's
    (FitNets-style hint). Only used during training; the projection is not exported."""

    def __init__(self, student: EdgeClassifier, teacher_features: int):
        super().__init__()
        self.student = student
        self.proj = nn.Linear(student.num_features, teacher_features)

    def forward(self, x):
        f = self.student.forward_features(x)
        return self.student.head(f), self.proj(f)


@dataclass(frozen=True)
class KDSettings:
    temperature: float
    alpha: float
    hint_weight: float = 0.0


@torch.no_grad()
def teacher_outputs(teacher: EdgeClassifier, x: torch.Tensor, batch_size: int = 128, features: bool = False):
    """Teacher logits (and penultimate features) in inference mode; autocast on CUDA."""
    teacher.eval()
    dev = next(teacher.parameters()).device
    amp = torch.autocast("cuda", dtype=torch.float16) if dev.type == "cuda" else contextlib.nullcontext()
    logits, feats = [], []
    with torch.inference_mode(), amp:
        for i in range(0, len(x), batch_size):
            xb = x[i : i + batch_size].to(dev, non_blocking=True)
            f = teacher.forward_features(xb.contiguous(memory_format=torch.channels_last) if xb.ndim == 4 else xb)
            logits.append(teacher.head(f).float().cpu())
            if features:
                feats.append(f.float().cpu())
    return torch.cat(logits), (torch.cat(feats) if features else None)


def train_student(
    student: EdgeClassifier,
    x: torch.Tensor,
    y: torch.Tensor,
    vx: torch.Tensor,
    vy: torch.Tensor,
    *,
    kd: KDSettings | None,
    epochs: int,
    lr: float,
    weight_decay: float,
    batch_size: int,
    seed: int,
    teacher: EdgeClassifier | None = None,
    cache_teacher: bool = True,
    teacher_cache: tuple | None = None,
    desc: str = "distill (student)",
    train_loader: DataLoader | None = None,
    mixup: float = 0.0,
    validate_every: int = 1,
    patience: int | None = None,
    balance: str = "none",
    select_metric: str = "accuracy",
) -> FitResult:
    """Train `student` with KD (kd=None: plain cross-entropy, the control run).

    train_loader: (image, label) batches to train on instead of (x, y), e.g. augmented views and
    unlabeled images (label -1); the teacher then runs live on every batch, so teacher and student
    see the same view ("patient and consistent", Beyer et al. 2022). mixup > 0 mixes each batch's
    inputs (Beta(mixup, mixup)) before the teacher sees them.
    cache_teacher=True (fixed inputs only) computes the teacher's outputs once; False runs the
    teacher live on every batch. teacher_cache: those outputs already computed,
    `teacher_outputs(teacher, x, features=hint)`, to share them between several students.
    """
    set_seed(seed)
    weights = class_weights(y, student.num_classes) if balance == "weights" else None
    settings = TrainSettings(epochs=epochs, lr=lr, weight_decay=weight_decay, warmup_epochs=1.0,
                             patience=patience, validate_every=validate_every,
                             class_weights=tuple(weights.tolist()) if weights is not None else None,
                             select_metric=select_metric)
    base = train_loader or tensor_loader(x, y, batch_size=batch_size, shuffle=True, seed=seed, balance=balance)
    if kd is None:
        return fit(student, base, vx, vy, settings=settings, desc=desc)
    if teacher is None:
        raise EdgekilnError("distillation needs a teacher")
    hint = kd.hint_weight > 0
    model: nn.Module = HintedStudent(student, teacher.num_features) if hint else student

    def loss_fn(out, labels, t_logits, labels2, lam, t_feats=None):
        s_logits, s_proj = out if hint else (out, None)
        loss = kd_loss(s_logits, t_logits, labels, kd.temperature, kd.alpha, labels2, lam,
                       weights.to(s_logits.device) if weights is not None else None)
        if hint:
            loss = loss + kd.hint_weight * F.mse_loss(s_proj, t_feats)
        return loss

    if cache_teacher and train_loader is None and mixup == 0:
        t_logits, t_feats = teacher_cache or teacher_outputs(teacher, x, features=hint)
        tensors = (x, y, t_logits, y, torch.ones(len(y))) + ((t_feats,) if hint else ())
        loader = tensor_loader(*tensors, batch_size=batch_size, shuffle=True, seed=seed, balance=balance)
    elif cache_teacher and train_loader is None and balance != "sampler" and not dist_info().enabled:
        # (a balanced sampler and torchrun's shards define their own epochs: those keep the live teacher)
        loader = mixup_pool_loader(teacher, x, y, mixup, batch_size, seed, hint)
    else:
        loader = _LiveTeacherLoader(base, teacher, hint, mixup, seed)
    val_model = student if not hint else _HeadOnly(model)
    return fit(model, loader, vx, vy, loss_fn, settings=settings, desc=desc, eval_model=val_model)


MIXUP_POOL = 4  # mixed pairs per training image whose teacher outputs are computed once (fixed inputs)


class _MixedPairs(Dataset):
    """Pair k: lam[k] * x[i[k]] + (1 - lam[k]) * x[j[k]], mixed when drawn, with the teacher's outputs on
    exactly that image computed once: (x, y, teacher logits, y of the mixed-in image, lam[, features])."""

    def __init__(self, x, y, i, j, lam, t_logits, t_feats=None):
        self.x, self.y, self.i, self.j, self.lam, self.t, self.f = x, y, i, j, lam, t_logits, t_feats

    def __len__(self) -> int:
        return len(self.i)

    def mixed(self, k) -> torch.Tensor:
        lam = self.lam[k].view(-1, *([1] * (self.x.ndim - 1)))
        return lam * self.x[self.i[k]] + (1 - lam) * self.x[self.j[k]]

    def __getitem__(self, k: int):
        return tuple(t[0] for t in self.__getitems__([k]))

    def __getitems__(self, ks: list[int]):
        """A whole batch at once (DataLoader's batched fetch; `_batch` is its collate)."""
        k = torch.as_tensor(ks)
        out = (self.mixed(k), self.y[self.i[k]], self.t[k], self.y[self.j[k]], self.lam[k])
        return out + ((self.f[k],) if self.f is not None else ())


def _batch(fetched):
    return fetched


def mixup_pool_loader(teacher, x, y, mixup: float, batch_size: int, seed: int, hint: bool,
                      rounds: int = MIXUP_POOL) -> DataLoader:
    """Mixup for the KD term without the teacher in the training loop: `rounds` mixed partners per
    training image (lam ~ Beta(mixup, mixup) per pair), the teacher run once over those pairs, and each
    epoch draws len(x) of them, so the step budget means what it means without mixup. The live teacher
    on every mixed batch made the digits demo's student training take 430 s instead of 259 s; mixing
    is cheap, the teacher is not, and a pool of a few pairs per image is what the student sees over
    a few dozen epochs anyway."""
    g = torch.Generator().manual_seed(seed)
    n = len(x)
    i = torch.arange(n).repeat(rounds)
    j = torch.cat([torch.randperm(n, generator=g) for _ in range(rounds)])
    lam = torch.distributions.Beta(torch.tensor(float(mixup)), torch.tensor(float(mixup))).sample((n * rounds,))
    pool = _MixedPairs(x, y, i, j, lam, None)
    outs = [teacher_outputs(teacher, pool.mixed(torch.arange(k, min(k + 256, len(i)))), features=hint)
            for k in range(0, len(i), 256)]
    pool.t = torch.cat([o[0] for o in outs])
    pool.f = torch.cat([o[1] for o in outs]) if hint else None
    sampler = RandomSampler(pool, num_samples=n, generator=g)
    return DataLoader(pool, batch_size=batch_size, sampler=sampler, collate_fn=_batch)


class _HeadOnly(nn.Module):
    def __init__(self, hinted: HintedStudent):
        super().__init__()
        self.hinted = hinted

    def forward(self, x):
        return self.hinted.student(x)


class _LiveTeacherLoader:
    """Wraps an (x, y) loader: mixes each batch's inputs when mixup > 0, then appends the teacher's
    outputs on exactly those inputs: (x, y, teacher logits, y of the mixed-in rows, lam[, features])."""

    def __init__(self, loader: DataLoader, teacher: EdgeClassifier, features: bool, mixup: float = 0.0, seed: int = 0):
        self.loader, self.teacher, self.features, self.mixup = loader, teacher, features, mixup
        self.seed, self.g = seed, torch.Generator().manual_seed(seed)
        self.sampler, self.generator = loader.sampler, getattr(loader, "generator", None)  # what fit reads

    def rewrap(self, loader: DataLoader) -> "_LiveTeacherLoader":
        """The same wrapper over another loader (fit's distributed shard of the wrapped one)."""
        return _LiveTeacherLoader(loader, self.teacher, self.features, self.mixup, self.seed)

    @property
    def inner(self) -> DataLoader:
        return self.loader

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for xb, yb in self.loader:
            y2, lam = yb, torch.ones(len(yb))
            if self.mixup > 0:
                lam_v = float(torch.distributions.Beta(self.mixup, self.mixup).sample())
                perm = torch.randperm(len(xb), generator=self.g)
                xb = lam_v * xb + (1 - lam_v) * xb[perm]
                y2, lam = yb[perm], torch.full((len(yb),), lam_v)
            t_logits, t_feats = teacher_outputs(self.teacher, xb, batch_size=len(xb), features=self.features)
            yield (xb, yb, t_logits, y2, lam) + ((t_feats,) if self.features else ())


def unlabeled_paths(folder: Path) -> list[Path]:
    """Every image under `folder` (flat or nested; folder names are ignored)."""
    from pipeline.data import IMAGE_EXTENSIONS

    folder = Path(folder)
    if not folder.is_dir():
        raise EdgekilnError(f"distill.unlabeled: {folder} is not a directory")
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                   and not p.name.startswith("."))
    if not paths:
        raise EdgekilnError(f"distill.unlabeled: {folder} holds no images")
    return paths


def view_loader(x_uint8: torch.Tensor, y: torch.Tensor, spec, augment: str, batch_size: int, seed: int,
                balance: str = "none") -> DataLoader:
    """Shuffled batches of augmented views of uint8 crops (label -1 marks an unlabeled image);
    balance='sampler' draws every class (and the unlabeled images as one more) equally often."""
    from pipeline.strategies.data import AugmentedImages, train_transform

    ds = AugmentedImages(x_uint8, y, train_transform(augment, spec))
    g = torch.Generator().manual_seed(seed)
    if balance == "sampler":
        return DataLoader(ds, batch_size=batch_size, sampler=balanced_sampler(y, g))
    return DataLoader(ds, batch_size=batch_size, shuffle=True, generator=g)


# --------------------------------------------------------------------------- cost on this machine


@dataclass(frozen=True)
class OnnxCost:
    params: int
    size_mb: float
    latency_b1_ms: float
    latency_b32_ms: float


def onnx_costs(models: dict[str, EdgeClassifier], input_size: Size, blocks: int = 10) -> dict[str, OnnxCost]:
    """Export each model to a temp ONNX file and time ONNX Runtime (CPU, default threads) at batch 1
    and 32, side by side in alternating blocks (exporters.bench.alternating_latency); medians."""
    from exporters.bench import alternating_latency
    from exporters.onnx_export import INPUT_NAME, export_onnx
    from runtime.backends.ort import open_onnx

    with tempfile.TemporaryDirectory() as d:
        runners, sizes = {}, {}
        for name, model in models.items():
            path = Path(d) / f"{len(runners)}.onnx"
            export_onnx(model.eval(), input_size, path)
            sizes[name] = path.stat().st_size / 1e6
            sess = open_onnx(path)
            runners[name] = lambda x, sess=sess: sess.run(None, {INPUT_NAME: x})
        lat = {}
        for b, per_block in ((1, 20), (32, 2)):
            x = np.random.default_rng(0).standard_normal((b, 3, *size_hw(input_size)), dtype=np.float32)
            times = alternating_latency(runners, x, blocks=blocks, per_block=per_block, warmup=3 if b == 1 else 1)
            lat[b] = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    return {
        k: OnnxCost(count_params(m), sizes[k], lat[1][k], lat[32][k])
        for k, m in models.items()
    }


def choose_student(
    candidates: list[str],
    num_classes: int,
    input_size: Size,
    max_latency_ms: float | None,
    max_size_mb: float | None,
) -> tuple[list[dict], list[str]]:
    """Measure every candidate's exported cost here; return (table, names that fit, largest first).

    Larger models within budget are tried first on the premise that capacity buys accuracy;
    the caller trains the fitting ones and keeps the most accurate.
    """
    rows, fits = [], []
    costs = onnx_costs({name: create_model(name, num_classes, "none", input_size=input_size)
                        for name in candidates}, input_size, blocks=3)
    for name in candidates:
        cost = costs[name]
        ok = (max_latency_ms is None or cost.latency_b1_ms <= max_latency_ms) and (
            max_size_mb is None or cost.size_mb <= max_size_mb
        )
        rows.append({"student": name, **cost.__dict__, "fits": ok})
        if ok:
            fits.append(name)
    fits.sort(key=lambda n: -next(r["params"] for r in rows if r["student"] == n))
    return rows, fits
