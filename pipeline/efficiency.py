"""Data efficiency: test accuracy against the number of labeled examples per class,
for each adapt strategy and for training from scratch (`edgekiln efficiency`).

Every method gets the same budget at a given size: the same optimizer steps
(`epochs` epochs, and at least `min_steps` steps so that 5 examples per class
still train for a while), the same k-per-class validation subset for picking the
best epoch, and the full test split for the number reported.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import PipelineConfig
from pipeline.errors import ConfigError
from pipeline.evaluation import plot_efficiency
from pipeline.models import create_model, model_defaults
from pipeline.report import write_run_report
from pipeline.rundir import load_split
from pipeline.strategies import AdaptContext, AdaptData, adapt_model, list_strategies, train_from_scratch
from pipeline.training import accuracy, set_seed
from runtime.files import atomic_write_text

log = logging.getLogger("edgekiln")

SCRATCH = "scratch"
# Learning rates that suit each strategy when it is not the one the config is tuned for.
DEFAULT_LR = {"feature_extraction": 3e-3, "finetune": 1e-3, "lora": 3e-3, SCRATCH: 3e-3}


def few_shot_indices(labels: list[int], k: int | None, seed: int) -> list[int]:
    """k indices per class (all of a class that has fewer), seeded, sorted; k=None keeps everything.

    The one per-class sampler (exporters.calibration.stratified_indices) with a total of
    sum(min(k, class size)): its round-robin then stops after exactly k rounds, so every class
    gets min(k, its size) and nothing is redistributed."""
    if k is None:
        return list(range(len(labels)))
    from exporters.calibration import stratified_indices

    counts = np.bincount(np.asarray(labels, dtype=np.int64))
    return stratified_indices(labels, int(np.minimum(counts, k).sum()), len(counts), seed)


def data_efficiency(
    cfg: PipelineConfig,
    shots: list[int | None],
    strategies: list[str] | None = None,
    epochs: int | None = None,
    min_steps: int = 30,
    scratch: bool = True,
) -> dict[str, Any]:
    """Train each strategy (and scratch) on k labeled examples per class for each k in `shots`
    (None = all); return {"shots", "accuracy": {method: {k: acc}}, "seconds": ...} and write
    efficiency.json, efficiency.png and report.md in the run directory."""
    from pipeline.adapt_stage import data_root, make_run_split

    strategies = strategies or list_strategies()
    for s in strategies:
        if s not in list_strategies():
            raise ConfigError(f"unknown strategy '{s}'; valid: {', '.join(list_strategies())}")
    run = cfg.run
    run.root.mkdir(parents=True, exist_ok=True)
    split = load_split(run) if run.split.is_file() else make_run_split(cfg, run)
    if Path(split.root) != Path(data_root(cfg.data)).resolve():
        log.warning("efficiency: using the split in %s (data root %s)", run.split, split.root)
    set_seed(cfg.seed)  # the new head's initialisation (torch seeds itself randomly per process)
    spec = model_defaults(cfg.model.name).preprocess(cfg.model.input_size, cfg.model.crop_pct)
    template = create_model(cfg.model.name, len(split.class_names), cfg.model.weights, input_size=spec.crop)
    data = AdaptData.from_split(split, spec)
    epochs = epochs or cfg.adapt.epochs or 5
    keys = ["all" if k is None else str(k) for k in shots]
    methods = list(strategies) + ([SCRATCH] if scratch else [])
    table: dict[str, dict[str, float]] = {m: {} for m in methods}
    seconds: dict[str, dict[str, float]] = {m: {} for m in methods}
    y_test = data.y("test")
    if "feature_extraction" in strategies:  # features of every image once; each subset slices them
        from pipeline.features import weights_digest

        digest = weights_digest(template.backbone)
        for part in data.PARTS:
            data.features(part, template.backbone.eval(), cfg.model.name, digest)
    for k, key in zip(shots, keys):
        sub = data.subset("train", few_shot_indices(data.labels("train"), k, cfg.seed))
        if k is not None:  # a few-shot user has a few-shot validation set too
            sub = sub.subset("val", few_shot_indices(data.labels("val"), k, cfg.seed))
        steps_per_epoch = math.ceil(len(sub.paths["train"]) / cfg.data.batch_size)
        ep = max(epochs, math.ceil(min_steps / steps_per_epoch))
        for method in methods:
            base = cfg.adapt if method == cfg.adapt.strategy else None
            update = {"epochs": ep, "baselines": False, "warmup_epochs": min(cfg.adapt.warmup_epochs, ep - 1)}
            if base is None:
                update.update(strategy=method if method != SCRATCH else "finetune", lr=DEFAULT_LR[method])
            a = (base or cfg.adapt).model_copy(update=update)
            ctx = AdaptContext(arch=cfg.model.name, seed=cfg.seed, batch_size=cfg.data.batch_size, desc=f"{method} k={key}")
            set_seed(cfg.seed)
            t0 = time.perf_counter()
            if method == SCRATCH:
                out = train_from_scratch(cfg.model.name, sub, a, ctx)
            else:
                out = adapt_model(copy.deepcopy(template), sub, a, ctx)
            table[method][key] = accuracy(out.test_logits, y_test)
            seconds[method][key] = time.perf_counter() - t0
            log.info("efficiency: %s, %s per class: test accuracy %.4f (%.0f s)", method, key, table[method][key], seconds[method][key])
    result = {
        "model": cfg.model.name, "shots": keys, "epochs": epochs, "min_steps": min_steps,
        "accuracy": table, "seconds": seconds, "plot": run.EFFICIENCY_PNG,
    }
    plot_efficiency(table, run.efficiency_png)
    atomic_write_text(run.efficiency_json, json.dumps(result, indent=2) + "\n")
    write_run_report(run, run.read_metrics())
    return result
