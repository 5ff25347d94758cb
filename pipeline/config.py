"""Pydantic configuration for every stage, and for the whole pipeline.

The CLI, YAML files and the Python API all build these same objects. Validation
happens once, here, at the edge; stages receive the narrow piece they need.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Sequence, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from exporters.config import (  # noqa: F401
    DeployConfig, ExportConfig, OODConfig, PrecisionThresholds, TensorRTConfig, TrustConfig, ValidateConfig,
)
from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.rundir import RunDir


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    """Where the images are and how they are split."""

    root: Path | None = Field(
        None, description="ImageFolder directory (one sub-folder per class). None with demo=true."
    )
    manifest: Path | None = Field(
        None, description="Instead of `root`: a CSV (path,label[,split]) or JSON Lines file listing the images; "
        "paths are relative to the manifest. A split column (train/val/test) keeps your own split.")
    task: Literal["multiclass", "multilabel"] = Field(
        "multiclass", description="'multiclass': one label per image (softmax). 'multilabel': a set of labels per "
        "image (sigmoid per label, per-label thresholds chosen on validation); needs a manifest with a `labels` "
        "column (CSV: labels joined by `label_separator`) or key (JSON Lines: a list).")
    label_separator: str = Field("|", min_length=1, description="With task multilabel: what joins the labels of "
                                 "one image in a CSV manifest's `labels` column.")
    demo: bool = Field(False, description="Use the built-in digits data set instead of `root`.")
    on_bad_file: Literal["fail", "skip"] = Field(
        "fail", description="An unreadable, corrupt, truncated or empty image: stop with every problem listed "
        "(fail), or leave it out and list it in the report (skip).")
    check: bool = Field(True, description="Check every file before training (edgekiln check-data).")
    balance: Literal["none", "weights", "sampler"] = Field(
        "none", description="Imbalanced classes, in adapt and distill: 'weights' weighs the cross-entropy (and "
        "the KD term) by inverse class frequency; 'sampler' draws training batches with every class equally "
        "likely (the logistic-regression head gets the class weights either way). Both then shift the adapted "
        "head's bias by -0.25 * log(class share of the training images) towards the rare classes.")
    select_metric: Literal["accuracy", "macro_f1"] = Field(
        "accuracy", description="The validation metric that picks the best epoch and drives early stopping in "
        "adapt and distill (macro_f1 weighs a rare class like a common one).")
    val_fraction: float = Field(0.15, gt=0, lt=1)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    batch_size: int = Field(64, ge=1)
    num_workers: int = Field(0, ge=0)
    ood: Path | None = Field(None, description="A folder of out-of-distribution images (none of the classes): "
                             "the OOD score's AUROC and FPR at 95% TPR are measured on them at export.")
    target: Path | None = Field(None, description="A folder (flat or nested) of unlabeled images from the "
                                "deployment domain; adapt.domain learns from them (folder names are ignored).")
    target_labeled: Path | None = Field(None, description="A small labeled ImageFolder of the deployment domain, "
                                        "used only to score and choose the domain method, never to train.")

    @model_validator(mode="after")
    def _root_or_demo(self) -> "DataConfig":
        given = [k for k, v in (("root", self.root), ("manifest", self.manifest), ("demo", self.demo or None))
                 if v is not None]
        if not given:
            raise ValueError("set `root` to an ImageFolder directory, `manifest` to a CSV/JSONL file, or `demo: true`")
        if len(given) > 1:
            raise ValueError(f"set one of root, manifest and demo, not {' and '.join(given)}")
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("val_fraction + test_fraction must leave at least 10% for training")
        if self.task == "multilabel":
            if self.manifest is None:
                raise ValueError("task multilabel needs `manifest` (a CSV/JSONL file with a labels column): "
                                 "class folders cannot give an image several labels")
            if self.balance != "none":
                raise ValueError("balance must be 'none' with task multilabel (class weights and the balanced "
                                 "sampler are defined for one label per image)")
        return self


class ModelConfig(_Strict):
    """The pretrained model to adapt (the teacher)."""

    name: str = Field("efficientnet_lite0", description="Registry name, e.g. torchvision/resnet18.")
    weights: str = Field("default", description="'none', 'default' or a path to a weights file.")
    input_size: int | list[int] | None = Field(
        None, description="Input side (square), or [height, width] for a rectangular input, each 16..1024; "
        "None keeps the model's own default."
    )
    crop_pct: float | None = Field(
        None, gt=0, le=1, description="Center-crop fraction (resize = input_size / crop_pct); None keeps the model's."
    )

    @field_validator("input_size", mode="before")
    @classmethod
    def _size(cls, v):
        """An int, or two ints [height, width]; [N, N] is the square N."""
        if v is None:
            return v
        sides = v if isinstance(v, (list, tuple)) else [v]
        if (len(sides) not in (1, 2) or (isinstance(v, (list, tuple)) and len(sides) != 2)
                or any(isinstance(s, bool) or not isinstance(s, int) or not 16 <= s <= 1024 for s in sides)):
            raise ValueError(f"must be an int or [height, width], each side 16..1024 (got {v!r})")
        return sides[0] if len(set(sides)) == 1 else list(sides)


DomainMethod = Literal["none", "style", "adabn", "dann", "ssl", "auto"]
StrategyName = Literal["feature_extraction", "finetune", "lora"]
STRATEGIES: tuple[str, ...] = get_args(StrategyName)


class FeatureExtractionOptions(_Strict):
    """Frozen backbone (BatchNorm statistics too), new head."""

    head: Literal["linear", "logistic_regression"] = Field(
        "linear", description="'linear': trained with the adapt optimizer on cached features; "
        "'logistic_regression': scikit-learn, folded into the linear head."
    )
    cache: bool = Field(True, description="Cache backbone features on disk (only used when adapt.augment is 'none').")
    C: float = Field(1.0, gt=0, description="Inverse regularisation strength of the logistic-regression head.")


class FinetuneOptions(_Strict):
    """Unfreeze some or all block groups (stem -> head) and train them with the head."""

    unfreeze: int | Literal["all"] = Field(
        "all", description="How many of the last backbone block groups to train ('all' or N >= 0; 0 = head only)."
    )
    layer_decay: float = Field(
        1.0, gt=0, le=1, description="LR multiplier per block group from head to stem (1.0 = the same LR everywhere)."
    )
    progressive_every: int | None = Field(
        None, ge=1, description="Unfreeze one more block group every K epochs, starting from `unfreeze`."
    )

    @field_validator("unfreeze")
    @classmethod
    def _non_negative(cls, v):
        if isinstance(v, int) and v < 0:
            raise ValueError("unfreeze must be 'all' or a number of block groups >= 0")
        return v

    @model_validator(mode="after")
    def _progressive_needs_a_start(self) -> "FinetuneOptions":
        if self.progressive_every and self.unfreeze == "all":
            raise ValueError("progressive_every needs `unfreeze` set to the number of block groups to start with (e.g. 0)")
        return self


class LoraOptions(_Strict):
    """Low-rank adapters (peft) on a frozen backbone; merged into the weights before saving."""

    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = Field(
        None, description="Module names (or name suffixes) to adapt; None = the architecture's defaults "
        "(pointwise 1x1 convolutions and linear layers)."
    )


class AdaptConfig(_Strict):
    """How the pretrained model is adapted. Options of the chosen strategy go in its own section."""

    strategy: StrategyName = "feature_extraction"
    epochs: int | None = Field(None, ge=1, description="Training length in epochs; None: sized to the data "
                               "(pipeline.training.budget). Set epochs or steps, not both.")
    steps: int | None = Field(None, ge=1, description="Training length in optimizer steps (rounded to whole epochs).")
    min_steps: int | None = Field(None, ge=1, description="Floor of the automatic budget (default: per strategy).")
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    warmup_epochs: float = Field(0.0, ge=0, description="Linear warm-up before the cosine schedule.")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    grad_clip: float | None = Field(None, gt=0, description="Clip the gradient norm to this value.")
    augment: Literal["none", "light", "strong"] = Field("none", description="Train-time augmentation preset.")
    patience: int | None = Field(10, ge=1, description="Early stopping: validations without a better val accuracy "
                                 "(None: train the whole budget; the best validated weights are kept either way).")
    baselines: bool = Field(False, description="Also train from scratch and a linear probe, and compare.")
    domain: DomainMethod | None = Field(None, description="Domain adaptation to data.target (pipeline.domain): "
                                        "none|style|adabn|dann|ssl|auto; default auto with data.target, else none.")
    ssl_steps: int = Field(100, ge=1, description="adapt.domain ssl: SimCLR warm-up steps of the backbone on target "
                           "and source images before the labeled training (about 2 s a step on 2 CPU cores at 96 px).")
    feature_extraction: FeatureExtractionOptions = FeatureExtractionOptions()
    finetune: FinetuneOptions = FinetuneOptions()
    lora: LoraOptions = LoraOptions()

    @model_validator(mode="after")
    def _options_match_strategy(self) -> "AdaptConfig":
        for other in STRATEGIES:
            # Default-valued sections are fine: config.yaml snapshots list every section.
            if other != self.strategy and other in self.model_fields_set and getattr(self, other) != type(getattr(self, other))():
                raise ValueError(f"the `{other}` section is set but strategy is '{self.strategy}'")
        if self.epochs is not None and self.steps is not None:
            raise ValueError("set epochs or steps, not both")
        if self.epochs is not None and self.warmup_epochs >= self.epochs:
            raise ValueError("warmup_epochs must be smaller than epochs")
        if self.strategy == "feature_extraction" and self.feature_extraction.head == "logistic_regression" and self.augment != "none":
            raise ValueError("feature_extraction.head 'logistic_regression' trains on cached features: set augment: none")
        return self

    @property
    def options(self) -> BaseModel:
        """The chosen strategy's own options."""
        return getattr(self, self.strategy)


class DistillConfig(_Strict):
    enabled: bool = True
    student: str = Field(
        "torchvision/mobilenet_v3_small", description="Registry name of the student, or 'auto' to pick one."
    )
    weights: str = Field("none", description="Student init: 'none', 'default' or a weights file.")
    temperature: float = Field(4.0, gt=0)
    alpha: float = Field(0.7, ge=0, le=1, description="Weight of the KD term; 1-alpha goes to cross-entropy.")
    hint_weight: float = Field(0.0, ge=0, description="Weight of the feature (hint) loss; 0 turns it off.")
    epochs: int | None = Field(None, ge=1, description="Training length in epochs; None: sized to the data.")
    steps: int | None = Field(None, ge=1, description="Training length in optimizer steps (set epochs or steps).")
    min_steps: int | None = Field(None, ge=1, description="Floor of the automatic budget (default 600 steps).")
    patience: int | None = Field(10, ge=1, description="Early stopping: validations without a better val accuracy.")
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    augment: Literal["none", "light", "strong"] = Field(
        "light", description="Train-time augmentation; teacher and student see the same augmented view "
        "(the teacher runs live on each batch). 'none': fixed inputs, teacher outputs computed once.")
    mixup: float = Field(0.0, ge=0, description="Mixup of the inputs for the KD term: Beta(mixup, mixup); 0 = off.")
    synthetic_outliers: float = Field(
        0.5, ge=0, le=4, description="Procedurally generated images of no class (dead leaves, 1/f noise; "
        "pipeline.synthetic) per training image, fed to the KD term as unlabeled images, so the student learns its "
        "teacher's answer off the data and its 'unknown' answer works (textures photo set: energy AUROC vs real "
        "faces and scenes 0.53 -> 0.99). Each batch grows by this share; the step budget does not. 0: off "
        "(also skipped with data.task multilabel or trust.ood off: no unknown answer to teach).")
    domain_views: bool = Field(True, description="When adapt restyled the source images to data.target's camera "
                               "(adapt.domain style), the student trains on the same restyled copies.")
    unlabeled: Path | None = Field(None, description="Folder of unlabeled images that feed the KD term (no labels needed).")
    min_retention: float = Field(0.98, ge=0, le=1, description="Adopt the student only when it keeps this share of "
                                 "the teacher's validation accuracy; otherwise the teacher is exported.")
    min_target_agreement: float = Field(
        0.9, ge=0, le=1, description="With data.target and no data.target_labeled: adopt the student only when it "
        "predicts the teacher's class on this share of the target images (with labels: min_retention on them).")
    cache_teacher: bool = Field(True, description="With augment 'none': compute teacher outputs once.")
    compare_without_kd: bool = Field(False, description="Also train the student without KD, same budget.")
    measure_cost: bool = Field(False, description="Also export teacher and student to ONNX here and time them "
                               "(the export stage measures every deployable candidate anyway).")
    max_latency_ms: float | None = Field(None, gt=0, description="With student 'auto': ONNX Runtime CPU batch-1 budget.")
    max_size_mb: float | None = Field(None, gt=0, description="With student 'auto': ONNX file size budget.")
    candidates: list[str] | None = Field(None, description="With student 'auto': names to consider (default: all).")
    auto_max_trained: int = Field(2, ge=1, description="With student 'auto': how many fitting candidates to train.")

    @model_validator(mode="after")
    def _length(self) -> "DistillConfig":
        if self.epochs is not None and self.steps is not None:
            raise ValueError("set epochs or steps, not both")
        return self


class PipelineConfig(_Strict):
    name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    seed: int = 0
    runs_dir: Path = Path("runs")
    data: DataConfig
    model: ModelConfig = ModelConfig()
    adapt: AdaptConfig = AdaptConfig()
    distill: DistillConfig = DistillConfig()
    export: ExportConfig = ExportConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    deploy: DeployConfig = DeployConfig()
    trust: TrustConfig = TrustConfig()

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)

    @model_validator(mode="after")
    def _multilabel_support(self) -> "PipelineConfig":
        if self.data.task != "multilabel":
            return self
        if self.adapt.strategy == "feature_extraction" and self.adapt.feature_extraction.head == "logistic_regression":
            raise ValueError("adapt.feature_extraction.head 'logistic_regression' is one softmax model; with "
                             "data.task multilabel use head: linear")
        if self.adapt.baselines:
            raise ValueError("adapt.baselines is not supported with data.task multilabel; set it to false")
        if self.data.ood is not None:
            raise ValueError("data.ood is not supported with data.task multilabel (the OOD score is a softmax "
                             "figure); unset it")
        e = self.export
        for field_name, asked in (("export.precisions", "int8" in (e.precisions or [])),
                                  ("export.openvino.precisions", "int8" in e.openvino.precisions),
                                  ("export.tensorrt.precision", e.tensorrt.enabled and e.tensorrt.precision == "int8")):
            if asked:
                raise ValueError(f"{field_name}: int8 is not supported with data.task multilabel (its calibration "
                                 "and guard judge softmax accuracy); use fp32 or fp16")
        return self

    @model_validator(mode="after")
    def _domain_needs_target(self) -> "PipelineConfig":
        d, a = self.data, self.adapt
        if d.target is None and d.target_labeled is not None:
            raise ValueError("data.target_labeled needs data.target (the unlabeled deployment images)")
        if a.domain is None:  # resolved once here, so config.yaml records the method that ran
            object.__setattr__(a, "domain", "auto" if d.target is not None else "none")
        if a.domain != "none" and d.target is None:
            raise ValueError(f"adapt.domain '{a.domain}' needs data.target (a folder of unlabeled deployment images)")
        if a.domain == "dann" and a.strategy != "finetune":
            raise ValueError("adapt.domain 'dann' trains the backbone: set adapt.strategy: finetune")
        if a.domain != "none" and d.task == "multilabel":
            raise ValueError("adapt.domain is not supported with data.task multilabel; set it to none")
        return self

    @model_validator(mode="after")
    def _ood_budget_needs_ood_images(self) -> "PipelineConfig":
        if self.deploy.min_ood_auroc is not None and (self.data.ood is None or not self.trust.ood.enabled):
            raise ValueError("deploy.min_ood_auroc needs data.ood (a folder of out-of-distribution images) and "
                             "trust.ood.enabled")
        return self

    @property
    def run_dir(self) -> Path:
        return self.runs_dir / self.name

    @property
    def run(self) -> "RunDir":
        """The run directory's paths and files (pipeline.rundir.RunDir)."""
        from pipeline.rundir import RunDir

        return RunDir(self.run_dir)


def format_validation_error(err: ValidationError, source: str = "config",
                            overridden: Sequence[str] = ()) -> str:
    """One short line per problem, naming the field path and where it came from: `source`, or
    `--set` when the field (or a section above or below it) is one of the `overridden` keys."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        hit = any(loc == k or loc.startswith(k + ".") or k.startswith(loc + ".") for k in overridden)
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling)"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        lines.append(f"{'--set' if hit else source}: {loc}: {msg}")
    return "\n".join(lines)


def build_config(raw: dict, source: str = "config", overrides: Sequence[str] = ()) -> PipelineConfig:
    """Validate `raw` after applying `--set key=value` overrides; a problem in an overridden key is
    reported against `--set`, every other one against `source`."""
    raw = apply_overrides(raw, overrides)
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as e:
        keys = [o.partition("=")[0].strip() for o in overrides]
        raise ConfigError(format_validation_error(e, source, keys)) from None


def apply_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    """A copy of `raw` with each `dotted.key=value` set; the value is read as YAML, so `false`, `3e-4`
    and `[fp32, int8]` mean what they mean in the config file. Unknown keys are left for the
    pydantic models to name, so a misspelling reads the same as in a YAML file."""
    out = copy.deepcopy(raw)
    for item in overrides:
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set {item}: expected key=value, e.g. --set adapt.strategy=lora")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"--set {key}: value is not valid YAML: {text}") from None
        node = out
        *parents, leaf = key.split(".")
        for i, part in enumerate(parents):
            nxt = node.setdefault(part, {})
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {key}: {'.'.join(parents[: i + 1])} is a value, not a section")
            node = nxt
        node[leaf] = value
    return out


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> PipelineConfig:
    """Read a pipeline YAML file, or take a data directory with every default (the run is named
    after the directory), then apply `--set` overrides; raise ConfigError with one line per problem."""
    path = Path(path)
    if path.is_dir() or path.suffix.lower() in (".csv", ".jsonl"):
        if not path.exists():
            raise ConfigError(f"manifest not found: {path}")
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", (path.resolve().name if path.is_dir() else path.stem)).strip("-._")
        key = "root" if path.is_dir() else "manifest"
        return build_config({"name": name or "run", "data": {key: str(path.resolve())}}, str(path), overrides)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (give a YAML config or a folder of class sub-folders)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of stage sections at the top level")
    cfg = build_config(raw, source=str(path), overrides=overrides)
    # Relative data paths are relative to the config file, like most tools do.
    if cfg.data.root is not None and not cfg.data.root.is_absolute():
        cfg.data.root = (path.parent / cfg.data.root).resolve()
    if cfg.data.manifest is not None and not cfg.data.manifest.is_absolute():
        cfg.data.manifest = (path.parent / cfg.data.manifest).resolve()
    if cfg.distill.unlabeled is not None and not cfg.distill.unlabeled.is_absolute():
        cfg.distill.unlabeled = (path.parent / cfg.distill.unlabeled).resolve()
    for key in ("ood", "target", "target_labeled"):
        value = getattr(cfg.data, key)
        if value is not None and not value.is_absolute():
            setattr(cfg.data, key, (path.parent / value).resolve())
    return cfg


def demo_config(runs_dir: Path = Path("runs"), name: str = "demo") -> PipelineConfig:
    """The built-in demo: digits, EfficientNet-Lite0 teacher, MobileNetV3-Small student.

    The digits are 8x8 pixels, so 96 px is enough; the student trains on fixed inputs with the
    teacher's logits computed once (augment 'none') for 15 epochs, so the demo ends in minutes on
    two CPU cores. The teacher is a linear probe on blurred 8x8 digits (about 0.95), weaker than
    the student trained on the labels, so the KD term gets weight 0.3 (alpha) and the labels 0.7:
    with the default 0.7 the student copies the teacher's mistakes (0.961 against 0.983 test,
    bench/RESULTS.md). A user's run gets the defaults instead: a step budget sized to the data and
    the same augmented view for teacher and student."""
    return PipelineConfig(name=name, runs_dir=runs_dir, data=DataConfig(demo=True),
                          model=ModelConfig(input_size=96, crop_pct=1.0),
                          distill=DistillConfig(augment="none", epochs=15, alpha=0.3))


def dump_config(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False)
