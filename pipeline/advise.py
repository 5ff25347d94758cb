"""`edgekiln advise DATA_DIR`: look at the data, run a quick linear probe on cached
backbone features, and recommend an adapt strategy with its reasons.

The rules (after the usual transfer-learning advice, e.g. cs231n's "Transfer Learning" notes):
- small data and a similar domain (the frozen features already separate the classes)
  -> feature_extraction: cheapest, and fine-tuning would mostly overfit;
- more data, or a distant domain (the probe is weak) -> finetune;
- a large model on a tight compute or memory budget -> lora (a few % of the weights train).
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from pipeline.data import make_split, scan_image_folder
from pipeline.errors import DataError

SMALL_PER_CLASS = 100  # median training images per class below this is "small data"
SIMILAR_PROBE = 0.85  # probe accuracy at or above this: the pretrained features fit the domain
STRONG_PROBE = 0.95  # ... and at or above this, fine-tuning has little left to win
LARGE_MODEL_PARAMS = 20_000_000


@dataclass
class DataStats:
    root: str
    images: int
    classes: int
    per_class: dict[str, int]
    imbalance: float  # largest class / smallest class
    width: tuple[int, int, int]  # min, median, max
    height: tuple[int, int, int]
    modes: dict[str, int]


def data_stats(root: Path) -> DataStats:
    class_names, items = scan_image_folder(Path(root))
    counts = Counter(y for _, y in items)
    ws, hs, modes = [], [], Counter()
    for rel, _ in items:
        try:
            with Image.open(Path(root) / rel) as im:  # reads the header only
                ws.append(im.width)
                hs.append(im.height)
                modes[im.mode] += 1
        except OSError as e:
            raise DataError(f"{Path(root) / rel}: cannot read image ({e})") from None
    per_class = {name: counts.get(i, 0) for i, name in enumerate(class_names)}
    return DataStats(
        root=str(root), images=len(items), classes=len(class_names), per_class=per_class,
        imbalance=max(per_class.values()) / max(1, min(per_class.values())),
        width=(min(ws), int(statistics.median(ws)), max(ws)), height=(min(hs), int(statistics.median(hs)), max(hs)),
        modes=dict(modes),
    )


@dataclass
class Advice:
    stats: DataStats
    model: str
    model_params: int
    input_size: int | tuple[int, int]  # a side, or (H, W)
    probe_val_accuracy: float
    train_per_class_median: float
    recommendation: str
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    domain: dict[str, Any] | None = None  # with a target folder: the domain gap and the method recommended

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def recommend(per_class_median: float, probe: float, n_classes: int, model_params: int, tight_budget: bool) -> tuple[str, list[str]]:
    """The rule table: (strategy, reasons)."""
    small = per_class_median < SMALL_PER_CLASS
    similar = probe >= SIMILAR_PROBE
    large = model_params >= LARGE_MODEL_PARAMS
    size = f"{per_class_median:.0f} training images per class ({'small' if small else 'enough to fine-tune'})"
    fit = f"a linear probe on the frozen features reaches {probe:.1%} validation accuracy " + (
        "(a similar domain: the pretrained features already separate the classes)" if similar
        else f"(a distant domain: below {SIMILAR_PROBE:.0%}, the features need adapting)"
    )
    if similar and (small or probe >= STRONG_PROBE):
        return "feature_extraction", [
            size, fit,
            "feature extraction trains only the head on cached features: seconds on a CPU, and little risk of overfitting",
        ]
    if tight_budget or large:
        why = "a tight compute/memory budget" if tight_budget else f"a large model ({model_params / 1e6:.0f}M parameters)"
        return "lora", [
            size, fit, f"{why}: LoRA trains low-rank adapters (a few % of the weights) and merges them for export",
        ]
    return "finetune", [
        size, fit, "fine-tuning (all block groups, layer-wise LR decay) adapts the features to the data",
    ]


def advise(
    root: Path, model_name: str = "efficientnet_lite0", weights: str = "default", input_size: int | None = None,
    crop_pct: float | None = None, tight_budget: bool = False, seed: int = 0, target: Path | None = None,
) -> Advice:
    """Data statistics + a logistic-regression probe on the model's (cached) features -> a strategy;
    with `target` (unlabeled deployment images), the domain gap and the domain method to use."""
    from pipeline.features import linear_probe, weights_digest
    from pipeline.models import count_params, create_model, model_defaults
    from pipeline.strategies import AdaptData

    stats = data_stats(root)
    split = make_split(Path(root), 0.15, 0.2, seed)
    spec = model_defaults(model_name).preprocess(input_size, crop_pct)
    model = create_model(model_name, len(split.class_names), weights, input_size=spec.crop)
    data = AdaptData.from_split(split, spec)
    digest = weights_digest(model.backbone)
    model.backbone.eval()
    f = {p: data.features(p, model.backbone, model_name, digest) for p in ("train", "val")}
    probe, _ = linear_probe(f["train"], data.y("train"), f["val"], data.y("val"), data.num_classes, seed=seed)
    per_class = statistics.median(Counter(data.labels("train")).values())
    params = count_params(model)
    strategy, reasons = recommend(per_class, probe, stats.classes, params, tight_budget)
    notes = []
    if stats.imbalance >= 3:
        notes.append(f"classes are imbalanced ({stats.imbalance:.1f}x between the largest and smallest): watch macro-F1, not only accuracy; "
                     "--set data.balance=weights favours the rare classes (bench/RESULTS.md: +5 macro-F1 points at 10:1)")
    if max(stats.width[1], stats.height[1]) < max(spec.hw) / 2:
        notes.append(f"images are small (median {stats.width[1]}x{stats.height[1]}) for input {spec.crop}: a smaller model.input_size is cheaper")
    if weights == "none":
        notes.append("weights: none -- the probe ran on random features; pass --weights default for a meaningful probe")
    domain = None
    if target is not None:
        domain = domain_advice(model, data, target, model_name, spec, seed)
    return Advice(stats, model_name, params, spec.crop, probe, float(per_class), strategy, reasons, notes, domain)


def domain_advice(model, data, target: Path, model_name: str, spec, seed: int) -> dict[str, Any]:
    """The gap between the source images and `target` on the frozen features, what it means, and
    the adapt.domain method `auto` would run without target labels."""
    from pipeline.domain import choose_unlabeled, load_target, measure_gap
    from pipeline.domain.explain import MEANING

    t = load_target(target, None, data.class_names, spec, seed)
    gap, closer = measure_gap(model, data, t, model_name, seed)
    method, why = choose_unlabeled(gap, closer)
    return {"target": str(target), "target_images": len(t.x_uint8), **gap.to_dict(), "meaning": MEANING[gap.level],
            "styled_closer": closer, "method": method, "reason": why, "describe": gap.describe()}
