"""The adapt stage: adapt the pretrained model (the teacher) with the strategy `adapt.strategy`
names (pipeline.strategies), evaluate it on the test split, optionally against the baselines,
and write checkpoints/teacher.safetensors, the `teacher` section of metrics.json and report.md.

    result = run_adapt(cfg)          # an AdaptResult
    result.test_accuracy, result.to_metrics()
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import DataConfig, PipelineConfig, dump_config
from pipeline.errors import EdgekilnError
from pipeline.rundir import RunDir, load_split
from runtime.files import atomic_write_text

if TYPE_CHECKING:
    from pipeline.data import Split

log = logging.getLogger("edgekiln")


# --------------------------------------------------------------------------- results


@dataclass
class Baseline:
    """A baseline's numbers on the same split (`metrics.json` teacher.baselines.<name>)."""

    val_accuracy: float
    test_accuracy: float
    macro_f1: float
    auc_roc_ovr: float | None
    train_seconds: float
    trainable_params: int | None = None  # the linear probe trains no network parameters

    @classmethod
    def from_metrics(cls, d: dict[str, Any]) -> "Baseline":
        return cls(d.get("val_accuracy"), d.get("test_accuracy"), d.get("macro_f1"), d.get("auc_roc_ovr"),
                   d.get("train_seconds", 0), d.get("trainable_params"))

    def to_metrics(self) -> dict[str, Any]:
        d: dict[str, Any] = {"val_accuracy": self.val_accuracy, "test_accuracy": self.test_accuracy,
                             "macro_f1": self.macro_f1, "auc_roc_ovr": self.auc_roc_ovr}
        if self.trainable_params is not None:
            d["trainable_params"] = self.trainable_params
        d["train_seconds"] = self.train_seconds
        return d


@dataclass
class AdaptResult:
    """What the adapt stage measured; `to_metrics()` is its `teacher` section of metrics.json."""

    model: str
    strategy: str
    val_accuracy: float
    test_accuracy: float
    macro_f1: float
    auc_roc_ovr: float | None
    best_epoch: int | None
    stopped_early: bool
    params: int
    trainable_params: int
    train_seconds: float
    extra: dict[str, Any] = field(default_factory=dict)  # the strategy's own numbers (e.g. `lora`)
    per_class: dict[str, dict] = field(default_factory=dict)
    confusion_matrix: list[list[int]] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    baselines: dict[str, Baseline] | None = None
    size_mb: float | None = None  # of the checkpoint (rank 0 only)
    plots: dict[str, str] | None = None  # plot name -> file in the run directory (rank 0 only)

    @property
    def trainable_fraction(self) -> float | None:
        return self.trainable_params / self.params if self.params else None

    @property
    def lora(self) -> dict[str, Any] | None:
        return self.extra.get("lora")

    @classmethod
    def from_metrics(cls, d: dict[str, Any]) -> "AdaptResult":
        """Back from a `teacher` section of metrics.json (the strategy's own keys land in `extra`)."""
        named = {f.name for f in fields(cls)} - {"extra"}
        b = d.get("baselines")
        return cls(
            model=d["model"], strategy=d.get("strategy", "?"), val_accuracy=d.get("val_accuracy"),
            test_accuracy=d.get("test_accuracy"), macro_f1=d.get("macro_f1"), auc_roc_ovr=d.get("auc_roc_ovr"),
            best_epoch=d.get("best_epoch"), stopped_early=d.get("stopped_early", False), params=d.get("params", 0),
            trainable_params=d.get("trainable_params", 0), train_seconds=d.get("train_seconds", 0),
            extra={k: v for k, v in d.items() if k not in named and k != "trainable_fraction"},
            per_class=d.get("per_class") or {}, confusion_matrix=d.get("confusion_matrix") or [],
            history=d.get("history") or [], baselines={k: Baseline.from_metrics(v) for k, v in b.items()} if b else None,
            size_mb=d.get("size_mb"), plots=d.get("plots"),
        )

    def to_metrics(self) -> dict[str, Any]:
        m: dict[str, Any] = {
            "model": self.model, "strategy": self.strategy, "val_accuracy": self.val_accuracy,
            "test_accuracy": self.test_accuracy, "macro_f1": self.macro_f1, "auc_roc_ovr": self.auc_roc_ovr,
            "best_epoch": self.best_epoch, "stopped_early": self.stopped_early, "params": self.params,
            "trainable_params": self.trainable_params, "trainable_fraction": self.trainable_fraction,
            "train_seconds": self.train_seconds, **self.extra, "per_class": self.per_class,
            "confusion_matrix": self.confusion_matrix, "history": self.history,
        }
        if self.baselines is not None:
            m["baselines"] = {k: b.to_metrics() for k, b in self.baselines.items()}
        if self.size_mb is not None:
            m["size_mb"] = self.size_mb
        if self.plots is not None:
            m["plots"] = self.plots
        return m


# --------------------------------------------------------------------------- run directory and split


def data_root(data: DataConfig) -> Path:
    from pipeline.data import demo_data_dir

    if data.demo:
        return demo_data_dir()
    return Path(data.manifest).resolve().parent if data.manifest is not None else Path(data.root)


def make_run_split(cfg: PipelineConfig, run: RunDir) -> "Split":
    """A new seeded, stratified split of the configured data (an ImageFolder or a manifest), saved
    as the run's split.json."""
    from pipeline.data import make_split

    d = cfg.data
    if d.check and d.task == "multilabel":
        log.warning("data: the data check (data.check) is not run for task multilabel yet; the manifest's rows "
                    "and files are still checked")
    skipped = check_run_data(cfg, run) if d.check and not d.demo and d.task != "multilabel" else []
    split = make_split(data_root(d), d.val_fraction, d.test_fraction, cfg.seed, manifest=d.manifest,
                       exclude=frozenset(skipped), task=d.task, separator=d.label_separator)
    split.save(run.split)
    return split


def check_run_data(cfg: PipelineConfig, run: RunDir) -> list[str]:
    """The data check before training (pipeline.datacheck): every problem at once. Writes
    data_check.json; raises DataError listing every blocking problem; returns the unreadable files
    that `data.on_bad_file: skip` leaves out."""
    import json

    from pipeline.datacheck import blocking_problems, check_data
    from pipeline.errors import DataError

    report = check_data(cfg.data, seed=cfg.seed)
    skipped = report.bad_files if cfg.data.on_bad_file == "skip" else []
    atomic_write_text(run.data_check, json.dumps({**report.to_dict(), "skipped": skipped}, indent=1) + "\n")
    shown: dict[str, int] = {}
    for p in report.warnings:  # a few of each kind; every one is in data_check.json
        shown[p.kind] = shown.get(p.kind, 0) + 1
        if shown[p.kind] <= 3:
            log.warning("data: %s", p.message)
    for kind, n in shown.items():
        if n > 3:
            log.warning("data: ... and %d more %s warning(s) in %s", n - 3, kind, run.data_check)
    blocking = blocking_problems(report, cfg.data.on_bad_file)
    if blocking:
        hint = " (data.on_bad_file: skip leaves unreadable files out)" if any(
            p.kind in ("zero_byte", "corrupt", "truncated") for p in blocking) else ""
        raise DataError(f"the data check found {len(blocking)} problem(s){hint}; details in {run.data_check}:\n"
                        + "\n".join(f"  {p.kind}: {p.message}" for p in blocking))
    if skipped:
        log.warning("data: skipped %d unreadable file(s) (data.on_bad_file: skip): %s", len(skipped), ", ".join(skipped))
    return skipped


def _check_resume(cfg: PipelineConfig, run: RunDir) -> None:
    from pipeline.training import load_resume_state

    saved = load_resume_state(run.adapt_resume)[0].get("config", {})
    if saved and (saved.get("adapt", {}).get("strategy"), saved.get("model")) != (
        cfg.adapt.strategy, cfg.model.model_dump(mode="json")
    ):
        raise EdgekilnError(f"{run.adapt_resume}: the checkpoint was made with another model or strategy; "
                            "run without --resume")


def _prepare(cfg: PipelineConfig, run: RunDir, resume: bool, info) -> "Split":
    """Rank 0 writes config.yaml and split.json (kept when resuming); every rank then reads the split."""
    if info.is_main:
        run.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run.config, dump_config(cfg))
        split = load_split(run) if resume and run.split.is_file() else make_run_split(cfg, run)
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()  # rank 0 has written split.json
        split = load_split(run)
    return split


# --------------------------------------------------------------------------- the stage


def run_adapt(cfg: PipelineConfig, resume: bool = False) -> AdaptResult:
    """Adapt the pretrained model with the strategy `adapt.strategy` names (see pipeline.strategies),
    evaluate it on the test split, optionally against the baselines, and write the run report.

    A resumable checkpoint is kept in checkpoints/adapt-resume/ while training runs
    (removed when the stage completes); resume=True continues from it.
    """
    from pipeline import evaluation
    from pipeline.checkpoint import CheckpointMeta, save_checkpoint
    from pipeline.models import check_runs, count_params, create_model, model_defaults
    from pipeline.strategies import AdaptContext, AdaptData, adapt_model, shift_to_rare
    from pipeline.training import init_distributed, set_seed

    a, run = cfg.adapt, cfg.run
    info = init_distributed()
    set_seed(cfg.seed)
    if resume:
        _check_resume(cfg, run)
    # The model's constraints (input size, family) are checked before the split is made or data loaded.
    defaults = model_defaults(cfg.model.name)
    spec = defaults.preprocess(cfg.model.input_size, cfg.model.crop_pct)
    defaults.check_input_size(cfg.model.name, spec.crop)
    split = _prepare(cfg, run, resume, info)
    model = create_model(cfg.model.name, len(split.class_names), cfg.model.weights, input_size=spec.crop)
    check_runs(model, spec.crop)
    h, w = spec.hw
    log.info("adapt: %s, strategy %s, %d classes, input %s", cfg.model.name, a.strategy, len(split.class_names),
             h if h == w else f"{h}x{w} (HxW)")
    data = AdaptData.from_split(split, spec)
    ctx = AdaptContext(
        arch=cfg.model.name, seed=cfg.seed, batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers,
        adapter_dir=run.lora_adapter, checkpoint_dir=run.adapt_resume, resume=resume,
        run_config=cfg.model_dump(mode="json", by_alias=True), is_main=info.is_main, desc=f"adapt ({a.strategy})",
        balance=cfg.data.balance, select_metric=cfg.data.select_metric,
    )
    params = count_params(model)
    t0 = time.perf_counter()
    if a.domain != "none":
        from pipeline.domain import adapt_to_domain, load_target

        target = load_target(cfg.data.target, cfg.data.target_labeled, split.class_names, spec, cfg.seed)
        out, domain = adapt_to_domain(model, data, a, ctx, target)
        out.extra = {**out.extra, "domain": domain}
    else:
        out = shift_to_rare(adapt_model(model, data, a, ctx), data, cfg.data.balance)  # adapt_to_domain shifts its own
    train_seconds = time.perf_counter() - t0
    ev = evaluation.classification_metrics(out.test_logits, data.y("test"), split.class_names)
    if split.multilabel:  # accuracy figures are mAP; these are the multilabel ones at probability 0.5
        out.extra = {**out.extra, "task": "multilabel",
                     **{k: ev[k] for k in ("map", "micro_f1", "exact_match")}}
    result = AdaptResult(
        model=cfg.model.name, strategy=a.strategy, val_accuracy=out.val_accuracy, test_accuracy=ev["accuracy"],
        macro_f1=ev["macro_f1"], auc_roc_ovr=ev["auc_roc_ovr"], best_epoch=out.fit.best_epoch if out.fit else None,
        stopped_early=out.fit.stopped_early if out.fit else False, params=params,
        trainable_params=out.trainable_params, train_seconds=train_seconds, extra=out.extra,
        per_class=ev["per_class"], confusion_matrix=ev["confusion_matrix"], history=out.fit.history if out.fit else [],
    )
    path = run.checkpoint("teacher")
    if info.is_main:  # saved before the (optional, slow) baselines, so an interruption there loses nothing
        meta = CheckpointMeta(arch=cfg.model.name, class_names=split.class_names, preprocess=spec, role="teacher",
                              extra={"strategy": a.strategy})
        save_checkpoint(out.model, meta, path)
        shutil.rmtree(run.adapt_resume, ignore_errors=True)
    scratch_history = None
    if a.baselines:
        result.baselines, scratch_history = _baselines(cfg, data, replace(ctx, adapter_dir=None, checkpoint_dir=None,
                                                                          resume=False, desc="baseline (scratch)"))
        _say_negative_transfer(result)
    if not info.is_main:
        return result
    result.size_mb = path.stat().st_size / 1e6
    result.plots = _plots(run, result, split.class_names, scratch_history)
    from pipeline.report import write_run_report

    write_run_report(run, run.update_metrics("teacher", result.to_metrics()))
    return result


def _say_negative_transfer(result: AdaptResult) -> None:
    from pipeline.domain import scratch_beats_pretrained

    scratch = (result.baselines or {}).get("scratch")
    note = scratch_beats_pretrained(result.val_accuracy, scratch.val_accuracy if scratch else None)
    if note:
        log.warning("adapt: %s", note)


def _baselines(cfg: PipelineConfig, data, ctx) -> tuple[dict[str, Baseline], list[dict] | None]:
    """The same architecture trained from scratch, and a linear probe on the frozen pretrained
    features; returns them and the scratch run's training history."""
    from pipeline import evaluation
    from pipeline.models import create_model
    from pipeline.strategies import linear_probe_baseline, shift_to_rare, train_from_scratch
    from pipeline.training import set_seed

    y_test, names = data.y("test"), data.class_names
    set_seed(cfg.seed)
    t0 = time.perf_counter()
    scratch = shift_to_rare(train_from_scratch(cfg.model.name, data, cfg.adapt, ctx), data, cfg.data.balance)
    sev = evaluation.classification_metrics(scratch.test_logits, y_test, names)
    scratch_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    probe = linear_probe_baseline(create_model(cfg.model.name, data.num_classes, cfg.model.weights,
                                               input_size=data.spec.crop), data,
                                  cfg.model.name, cfg.seed, cfg.data.balance)
    pev = evaluation.classification_metrics(probe["test_logits"], y_test, names)
    return {
        "scratch": Baseline(scratch.val_accuracy, sev["accuracy"], sev["macro_f1"], sev["auc_roc_ovr"], scratch_s,
                            scratch.trainable_params),
        "linear_probe": Baseline(probe["val_accuracy"], pev["accuracy"], pev["macro_f1"], pev["auc_roc_ovr"],
                                 time.perf_counter() - t0),
    }, (scratch.fit.history if scratch.fit else None)


def _plots(run: RunDir, result: AdaptResult, class_names: list[str], scratch_history: list[dict] | None) -> dict[str, str]:
    """The confusion matrix, and the training curves when anything trained by epochs."""
    from pipeline import evaluation

    plots = {}
    if result.confusion_matrix:  # none for task multilabel
        plots["confusion_matrix"] = run.CONFUSION_PNG
        evaluation.plot_confusion_matrix(result.confusion_matrix, class_names, run.confusion_png,
                                         title=f"{result.model} ({result.strategy}), test split")
    curves = {result.strategy: result.history}
    if scratch_history is not None:
        curves["scratch (baseline)"] = scratch_history
    if any(curves.values()):
        evaluation.plot_training_curves(curves, run.curves_png)
        plots["training_curves"] = run.CURVES_PNG
    return plots
