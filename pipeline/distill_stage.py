"""The distill stage: train a smaller student with Hinton KD (+ optional hint loss) against the
adapted teacher, justify it (accuracy retained, parameters, ONNX size and latency relative to the
teacher, optionally the same student without KD), and write checkpoints/student.safetensors and
the `student` section of metrics.json.

    result = run_distill(cfg)        # a DistillResult
    result.accuracy_retained, result.to_metrics()
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.config import DistillConfig, PipelineConfig
from pipeline.errors import EdgekilnError
from pipeline.rundir import load_split

if TYPE_CHECKING:
    from pipeline.distill import KDSettings, OnnxCost
    from runtime.preprocess import Size

log = logging.getLogger(__name__)


@dataclass
class WithoutKD:
    """The control run: the same student trained without KD, same budget."""

    test_accuracy: float
    val_accuracy: float


@dataclass
class DistillResult:
    """What the distill stage measured; `to_metrics()` is its `student` section of metrics.json."""

    model: str
    val_accuracy: float
    test_accuracy: float
    teacher_model: str
    teacher_test_accuracy: float
    best_epoch: int
    params: int
    teacher_params: int
    kd: "KDSettings"
    train_seconds: float
    history: list[dict] = field(default_factory=list)
    auto: dict[str, Any] | None = None  # with student 'auto': {"candidates": [...], "trained": [...]}
    without_kd: WithoutKD | None = None
    student_cost: "OnnxCost | None" = None
    teacher_cost: "OnnxCost | None" = None
    size_mb: float = 0.0  # of the student checkpoint
    adopted: bool = True  # the retention gate: False = refused, the teacher is exported instead
    retention: float | None = None  # student / teacher validation accuracy (same images)
    teacher_val_accuracy: float | None = None
    val_drop: dict[str, Any] | None = None  # exporters.stats.paired_drop on the validation images
    refusal: str | None = None  # why the student was refused, and what to try
    budget: str | None = None  # the training budget, as it was printed
    target_gate: dict[str, Any] | None = None  # with data.target: what target_gate measured

    @property
    def accuracy_retained(self) -> float | None:
        return self.test_accuracy / self.teacher_test_accuracy if self.teacher_test_accuracy else None

    @property
    def params_ratio(self) -> float:
        return self.params / self.teacher_params

    @property
    def kd_gain(self) -> float | None:
        return None if self.without_kd is None else self.test_accuracy - self.without_kd.test_accuracy

    @property
    def onnx_size_ratio(self) -> float:
        return self.student_cost.size_mb / self.teacher_cost.size_mb

    @property
    def latency_b1_ratio(self) -> float:
        return self.student_cost.latency_b1_ms / self.teacher_cost.latency_b1_ms

    @property
    def latency_b32_ratio(self) -> float:
        return self.student_cost.latency_b32_ms / self.teacher_cost.latency_b32_ms

    @classmethod
    def from_metrics(cls, d: dict[str, Any]) -> "DistillResult":
        """Back from a `student` section of metrics.json."""
        from pipeline.distill import KDSettings, OnnxCost

        cost = d.get("onnx_cost")
        return cls(
            model=d["model"], val_accuracy=d["val_accuracy"], test_accuracy=d["test_accuracy"],
            teacher_model=d["teacher_model"], teacher_test_accuracy=d["teacher_test_accuracy"],
            best_epoch=d["best_epoch"], params=d["params"], teacher_params=d["teacher_params"],
            kd=KDSettings(**d["kd"]), train_seconds=d.get("train_seconds", 0.0), history=d.get("history") or [],
            auto=d.get("auto"), without_kd=WithoutKD(**d["without_kd"]) if d.get("without_kd") else None,
            student_cost=OnnxCost(**cost["student"]) if cost else None,
            teacher_cost=OnnxCost(**cost["teacher"]) if cost else None, size_mb=d.get("size_mb", 0.0),
            adopted=d.get("adopted", True), retention=d.get("retention"),
            teacher_val_accuracy=d.get("teacher_val_accuracy"), val_drop=d.get("val_drop"),
            refusal=d.get("refusal"), budget=d.get("budget"), target_gate=d.get("target_gate"),
        )

    def to_metrics(self) -> dict[str, Any]:
        m: dict[str, Any] = {
            "model": self.model, "val_accuracy": self.val_accuracy, "test_accuracy": self.test_accuracy,
            "teacher_model": self.teacher_model, "teacher_test_accuracy": self.teacher_test_accuracy,
            "accuracy_retained": self.accuracy_retained, "best_epoch": self.best_epoch, "params": self.params,
            "teacher_params": self.teacher_params, "params_ratio": self.params_ratio, "kd": asdict(self.kd),
            "train_seconds": self.train_seconds, "history": self.history,
        }
        if self.auto is not None:
            m["auto"] = self.auto
        if self.without_kd is not None:
            m["without_kd"] = asdict(self.without_kd)
            m["kd_gain"] = self.kd_gain
        if self.student_cost is not None:
            m["onnx_cost"] = {"student": asdict(self.student_cost), "teacher": asdict(self.teacher_cost)}
            m["onnx_size_ratio"] = self.onnx_size_ratio
            m["latency_b1_ratio"] = self.latency_b1_ratio
            m["latency_b32_ratio"] = self.latency_b32_ratio
        m["size_mb"] = self.size_mb
        m.update(adopted=self.adopted, retention=self.retention, teacher_val_accuracy=self.teacher_val_accuracy,
                 val_drop=self.val_drop, refusal=self.refusal, budget=self.budget,
                 target_gate=self.target_gate)
        return m


def _candidates(dcfg: DistillConfig, n_classes: int, crop: Size) -> tuple[list[str], dict[str, Any] | None]:
    """The student names to train: the configured one, or with 'auto' the fitting candidates
    (measured on this machine), and the `auto` table."""
    from pipeline.distill import STUDENTS, choose_student

    if dcfg.student != "auto":
        return [dcfg.student], None
    table, fits = choose_student(list(dcfg.candidates or STUDENTS), n_classes, crop, dcfg.max_latency_ms,
                                 dcfg.max_size_mb)
    if not fits:
        raise EdgekilnError(
            "distill: no candidate student fits max_latency_ms/max_size_mb on this machine; "
            + ", ".join(f"{r['student']}: {r['latency_b1_ms']:.1f} ms, {r['size_mb']:.1f} MB" for r in table)
        )
    names = fits[: dcfg.auto_max_trained]
    return names, {"candidates": table, "trained": names}


def retention_gate(teacher_val_logits, student_val_logits, vy, min_retention: float,
                   images: str = "validation") -> dict[str, Any]:
    """Adopt the student only when it keeps >= min_retention of the teacher's validation accuracy
    on the same images. A refused student costs the user nothing (the teacher is exported), so
    the verdict follows the measured retention; the paired interval (exporters.stats.paired_drop, the
    statistic every parity gate uses) is
    reported with it so the user sees how much a few dozen images can tell."""
    from exporters.stats import paired_drop

    y = vy.numpy()
    if vy.ndim == 2:  # task multilabel: retention of the val mAP; the paired drop over every image x label at 0.5
        from pipeline.training import accuracy

        t_ok = ((teacher_val_logits.numpy() >= 0) == (y > 0.5)).ravel()
        s_ok = ((student_val_logits.numpy() >= 0) == (y > 0.5)).ravel()
        t_acc, s_acc = accuracy(teacher_val_logits, vy), accuracy(student_val_logits, vy)
    else:
        t_ok, s_ok = teacher_val_logits.argmax(1).numpy() == y, student_val_logits.argmax(1).numpy() == y
        t_acc, s_acc = float(t_ok.mean()), float(s_ok.mean())
    retention = s_acc / t_acc if t_acc > 0 else 1.0
    drop = paired_drop(t_ok, s_ok).to_dict()
    adopted = retention >= min_retention
    refusal = None if adopted else (
        f"student refused: it keeps {retention:.1%} of the teacher's {images} accuracy ({s_acc:.3f} vs {t_acc:.3f} "
        f"on {drop['n']} images; drop {100 * drop['drop']:.1f} points, 95% CI {100 * drop['low']:.1f} to "
        f"{100 * drop['high']:.1f}), under distill.min_retention {min_retention:.0%}; the teacher will be exported. "
        "To try: a longer budget (distill.steps), unlabeled images (distill.unlabeled), a pretrained student "
        "(distill.student: efficientnet_lite0, weights: default, under a larger teacher such as efficientnet_lite2)")
    return {"adopted": adopted, "retention": retention, "teacher_val_accuracy": t_acc, "val_drop": drop,
            "refusal": refusal}


def _teacher_domain(cfg: PipelineConfig) -> str | None:
    """The domain method the adapt stage used for the teacher (metrics.json), or None."""
    return ((cfg.run.read_metrics().get("teacher") or {}).get("domain") or {}).get("method")


def target_gate(teacher, student, target, min_agreement: float, min_retention: float) -> dict[str, Any]:
    """Judge the student on the deployment camera (data.target), which the retention gate (source-camera
    validation images) never sees: a student can keep the teacher's accuracy there and lose the target.
    Measured on three photo sets -> dusk (H100, 3 seeds): students at 0.40 to 0.87 on the target whose
    teachers scored 0.53 to 0.76, with source test accuracy 0.95 to 1.00 for all of them.

    With data.target_labeled: the retention rule on those labeled images (student >= min_retention of
    the teacher's accuracy), so a student better than its teacher on the target ships. Without labels:
    the share `a` of data.target images on which the student predicts the teacher's class; such a
    student scores at least the teacher's target accuracy minus (1 - a), so a >= min_agreement bounds
    what adopting it can cost. Point estimates like the retention gate, with the Wilson interval."""
    from exporters.stats import agreement_interval
    from pipeline.training import predict_logits

    if target.labeled_y is not None:
        x = target.labeled_x()
        gate = retention_gate(predict_logits(teacher, x), predict_logits(student, x), target.labeled_y, min_retention,
                              images="data.target_labeled")
        return {"judged_on": "data.target_labeled", "adopted": gate["adopted"], "retention": gate["retention"],
                "teacher_accuracy": gate["teacher_val_accuracy"], "n": gate["val_drop"]["n"],
                "drop": gate["val_drop"], "refusal": gate["refusal"]}
    x = target.x()
    agree = predict_logits(teacher, x).argmax(1) == predict_logits(student, x).argmax(1)
    k, n = int(agree.sum()), len(agree)
    share = k / n
    low, high = agreement_interval(k, n)
    ok = share >= min_agreement
    refusal = None if ok else (
        f"student refused: it predicts the teacher's class on {share:.1%} of the {n} data.target images (95% CI "
        f"{100 * low:.1f} to {100 * high:.1f} %), under distill.min_target_agreement {min_agreement:.0%}: without "
        "target labels nothing shows it is as accurate on the deployment camera, so the teacher will be exported. "
        "To try: a few labeled target images (data.target_labeled) to judge it by accuracy instead")
    return {"judged_on": "data.target", "adopted": ok, "agreement": share, "n": n, "low": low, "high": high,
            "refusal": refusal}


def _describe_target_gate(tg: dict[str, Any]) -> str:
    if "agreement" in tg:
        return f"the student predicts the teacher's class on {100 * tg['agreement']:.1f}% of {tg['n']} images"
    return f"the student keeps {100 * tg['retention']:.1f}% of the teacher's accuracy ({tg['n']} images)"


def _with_unlabeled(x, y, extra):
    """`x`, `y` with the rows `extra` appended, labeled -1 (unlabeled: they feed the KD term alone)."""
    import torch

    return torch.cat([x, extra]), torch.cat([y, torch.full((len(extra), *y.shape[1:]), -1, dtype=y.dtype)])


def generated_count(cfg: PipelineConfig, n_train: int) -> int:
    """How many generated images of no class join the KD term (distill.synthetic_outliers per
    training image): none where there is no unknown answer for them to teach (multi-label, or
    trust.ood off)."""
    if cfg.data.task != "multiclass" or not cfg.trust.ood.enabled:
        return 0
    return round(cfg.distill.synthetic_outliers * n_train)


def _views(cfg: PipelineConfig, split, spec) -> tuple[Any, int, int]:
    """(loader factory, (batch size, labeled_only=False) -> augmented views of the training images plus
    the unlabeled and generated ones, or None for fixed inputs; the number of real images, which sizes the budget; the
    number of generated images of no class, generated_count)."""
    import torch

    from pipeline.distill import unlabeled_paths, view_loader
    from pipeline.domain.target import target_paths
    from pipeline.strategies.data import load_uint8

    dcfg, train = cfg.distill, split.paths("train")
    n_generated = generated_count(cfg, len(train))
    # With adapt.domain, the deployment camera's images feed the KD term too: the teacher labels them.
    folders = [f for f in (dcfg.unlabeled, cfg.data.target if cfg.adapt.domain != "none" else None) if f is not None]
    if dcfg.augment == "none" and not folders:
        # fixed inputs (mixup: a pool of mixed pairs, distill.mixup_pool_loader); `run` appends the generated ones
        return None, len(train), n_generated
    from pipeline.data import label_tensor

    x8, y = load_uint8(train, spec), label_tensor(split.labels("train"))
    if dcfg.domain_views and folders and _teacher_domain(cfg) == "style" and cfg.data.target is not None:
        # The teacher learned the target camera from restyled source images; a student that sees only
        # the originals and the few unlabeled target images fails on the target (textures -> dusk:
        # teacher 0.58, student 0.36 of 3 classes), so it trains on the same restyled copies.
        from pipeline.domain.methods import STYLE_COPIES
        from pipeline.domain.style import restyled_copies

        target = load_uint8(target_paths(cfg.data.target, cfg.seed), spec)
        styled, _, t_stats = restyled_copies(x8, target, cfg.seed, STYLE_COPIES)
        log.info("distill: %d restyled copies of each training image (blur sigma %.1f px, noise %.3f), as adapt made",
                 STYLE_COPIES, t_stats.blur_sigma, t_stats.add_noise)
        x8, y = torch.cat([x8, styled]), torch.cat([y] * (STYLE_COPIES + 1))
    for folder in folders:  # of data.target, the 'train' half (the other judges the student: target_paths)
        extra = target_paths(folder, cfg.seed, "train") if folder == cfg.data.target else unlabeled_paths(folder)
        log.info("distill: %d unlabeled images from %s feed the KD term", len(extra), folder)
        x8, y = _with_unlabeled(x8, y, load_uint8(extra, spec))
    n_real = len(y)
    if n_generated:
        from pipeline.strategies.data import uint8_crops
        from pipeline.synthetic import synthetic_images

        x8, y = _with_unlabeled(x8, y, uint8_crops(synthetic_images(n_generated, cfg.seed), n_generated, spec))
    labeled = (y.reshape(len(y), -1) != -1).any(1)  # the rows with a label (unlabeled, generated: -1)

    def views(batch: int, labeled_only: bool = False):
        keep = labeled if labeled_only else slice(None)
        return view_loader(x8[keep], y[keep], spec, dcfg.augment, batch, cfg.seed, cfg.data.balance)

    return views, n_real, n_generated


class _TeacherOnFixedImages:
    """The teacher's features and logits on the split's un-augmented images, through the adapt
    stage's on-disk feature cache (pipeline.features): the teacher in eval mode is a fixed function
    of each image, and a feature-extraction teacher's backbone is the very one adapt already ran
    over these files, so the distill stage reads its features instead of running it again (keyed
    on the backbone's weights: a fine-tuned teacher misses once and is cached for re-runs)."""

    def __init__(self, teacher, arch: str, split, spec, images: dict):
        from pipeline.features import weights_digest

        self.teacher, self.arch, self.split, self.spec, self.images = teacher, arch, split, spec, images
        self.digest = weights_digest(teacher.backbone)
        self._memo: dict = {}

    def features(self, part: str) -> torch.Tensor:
        from pipeline.features import cached_features

        if part not in self._memo:
            backbone = self.teacher.backbone.eval()
            self._memo[part] = cached_features(backbone, self.arch, self.split.paths(part), self.split.labels(part),
                                               self.spec, images=self.images[part], weights=self.digest,
                                               desc=f"teacher {part}")
        return self._memo[part]

    def logits(self, part: str) -> torch.Tensor:
        import torch

        head = self.teacher.head.eval()
        with torch.inference_mode():
            return head(self.features(part).to(next(head.parameters()).device)).float().cpu()


def run_distill(cfg: PipelineConfig) -> DistillResult:
    """Train a smaller student with KD against the adapted teacher (same augmented view for both,
    teacher live; a step budget sized to the data), judge it with the retention gate, and justify
    it: accuracy retained, parameters, optionally ONNX size and latency and the no-KD control."""
    import torch

    from pipeline.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
    from pipeline.data import load_tensors
    from pipeline.distill import KDSettings, build_student, onnx_costs, train_student
    from pipeline.models import count_params
    from pipeline.training import accuracy, predict_logits, set_seed, train_device
    from pipeline.training.budget import plan_budget

    dcfg, run = cfg.distill, cfg.run
    set_seed(cfg.seed)
    split = load_split(run)
    teacher, tmeta = load_checkpoint(run.checkpoint("teacher"))
    teacher.to(train_device())  # its logits (cached or live) come from the training device
    spec, n_classes = tmeta.preprocess, len(split.class_names)
    x, y = load_tensors(split.paths("train"), split.labels("train"), spec, desc="loading train images")
    vx, vy = load_tensors(split.paths("val"), split.labels("val"), spec, desc="loading val images")
    tx, ty = load_tensors(split.paths("test"), split.labels("test"), spec, desc="loading test images")
    t_out = _TeacherOnFixedImages(teacher, tmeta.arch, split, spec, {"train": x, "val": vx, "test": tx})
    teacher_test_acc = accuracy(t_out.logits("test"), ty)
    kd = KDSettings(dcfg.temperature, dcfg.alpha, dcfg.hint_weight)
    views, n_images, n_generated = _views(cfg, split, spec)
    budget = plan_budget("distill", n_images, cfg.data.batch_size, epochs=dcfg.epochs, steps=dcfg.steps,
                         min_steps=dcfg.min_steps)
    # The budget is sized to the real images; the generated ones ride along, each batch grown by their
    # share, so they add that share to a step's time and take no visits from the real images (counted
    # in the budget, 300 of them doubled the batch on 120 photos: student training x1.8-3.1).
    batch = math.ceil(budget.batch_size * (n_images + n_generated) / n_images)
    described = budget.describe()
    generated = None  # fixed inputs: the generated images as tensors
    x_labeled, y_labeled = x, y  # the no-KD control's: cross-entropy needs labels
    if n_generated:
        described += f"; each batch also carries {batch - budget.batch_size} of {n_generated} generated images of no class"
        log.info("distill: %d generated images of no class (distill.synthetic_outliers %g per training image) feed "
                 "the KD term", n_generated, dcfg.synthetic_outliers)
        if views is None:  # fixed inputs: they join x as unlabeled rows, and the teacher labels them once
            from pipeline.synthetic import synthetic_tensors

            generated = synthetic_tensors(n_generated, spec, seed=cfg.seed)
            x, y = _with_unlabeled(x, y, generated)
    log.info("distill: training budget %s", described)
    common = dict(epochs=budget.epochs, lr=dcfg.lr, weight_decay=dcfg.weight_decay, batch_size=batch,
                  seed=cfg.seed, validate_every=budget.validate_every, patience=dcfg.patience,
                  balance=cfg.data.balance, select_metric=cfg.data.select_metric)
    names, auto = _candidates(dcfg, n_classes, spec.crop)

    best = None
    t0 = time.perf_counter()
    # Several `auto` candidates share one pass of the teacher over the (fixed) training images.
    shared = ((t_out.logits("train"), t_out.features("train") if kd.hint_weight > 0 else None)
              if views is None and dcfg.cache_teacher and dcfg.mixup == 0 else None)
    if shared is not None and generated is not None:
        from pipeline.distill import teacher_outputs

        g_logits, g_feats = teacher_outputs(teacher, generated, features=kd.hint_weight > 0)
        shared = (torch.cat([shared[0], g_logits]), torch.cat([shared[1], g_feats]) if g_feats is not None else None)
    for name in names:
        student = build_student(name, n_classes, dcfg.weights, spec.crop)
        fitted = train_student(student, x, y, vx, vy, kd=kd, teacher=teacher, cache_teacher=dcfg.cache_teacher,
                               teacher_cache=shared, desc=f"distill ({name})", mixup=dcfg.mixup,
                               train_loader=views(batch) if views else None, **common)
        if best is None or fitted.best_val_accuracy > best[2].best_val_accuracy:
            best = (name, student, fitted)
    name, student, fitted = best
    train_seconds = time.perf_counter() - t0
    gate = retention_gate(t_out.logits("val"), predict_logits(student, vx), vy, dcfg.min_retention)
    result = DistillResult(
        model=name, val_accuracy=fitted.best_val_accuracy, test_accuracy=accuracy(predict_logits(student, tx), ty),
        teacher_model=tmeta.arch, teacher_test_accuracy=teacher_test_acc, best_epoch=fitted.best_epoch,
        params=count_params(student), teacher_params=count_params(teacher), kd=kd,
        train_seconds=train_seconds, history=fitted.history, auto=auto, budget=described, **gate,
    )
    if cfg.data.target is not None and cfg.adapt.domain != "none" and vy.ndim == 1:
        from pipeline.domain import load_target

        target = load_target(cfg.data.target, cfg.data.target_labeled, split.class_names, spec, cfg.seed, "check")
        tg = target_gate(teacher, student, target, dcfg.min_target_agreement, dcfg.min_retention)
        result.target_gate = {k: v for k, v in tg.items() if k not in ("adopted", "refusal")}
        log.info("distill: on %s, %s", tg["judged_on"], _describe_target_gate(tg))
        if result.adopted and not tg["adopted"]:
            result.adopted, result.refusal = False, tg["refusal"]
    if result.refusal:
        log.warning("distill: %s", result.refusal)
    if dcfg.compare_without_kd:
        control = build_student(name, n_classes, dcfg.weights, spec.crop)
        # the labeled images alone, at the real images' batch: cross-entropy has nothing to learn from
        # the unlabeled and generated rows (label -1)
        c_fit = train_student(control, x_labeled, y_labeled, vx, vy, kd=None,
                              desc=f"control, no KD ({name})",
                              train_loader=views(budget.batch_size, labeled_only=True) if views else None,
                              **{**common, "batch_size": budget.batch_size})
        result.without_kd = WithoutKD(accuracy(predict_logits(control, tx), ty), c_fit.best_val_accuracy)
    teacher.cpu()  # ONNX export (cost measurement) traces on the CPU
    if dcfg.measure_cost:
        costs = onnx_costs({"student": student, "teacher": teacher}, spec.crop)
        result.student_cost, result.teacher_cost = costs["student"], costs["teacher"]
    del teacher

    path = run.checkpoint("student")
    meta = CheckpointMeta(arch=name, class_names=split.class_names, preprocess=spec, role="student",
                          extra={"teacher": tmeta.arch, "temperature": dcfg.temperature, "alpha": dcfg.alpha,
                                 "adopted": result.adopted})
    save_checkpoint(student, meta, path)
    result.size_mb = path.stat().st_size / 1e6
    run.update_metrics("student", result.to_metrics())
    return result
