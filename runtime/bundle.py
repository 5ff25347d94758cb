"""The bundle: a self-describing deployment directory (bundle.json + model files).

`bundle.json` is the one contract between the training side, the exporters and
the runtime, written down once here as pydantic models (`BundleManifest`) and
read and written only through them:

    bundle = read_bundle("runs/demo/bundle")          # parses, checks every name and sha256
    bundle.manifest.artifacts["onnx_int8"].precision  # 'int8'
    bundle.path("onnx")                               # Path inside the bundle, checked
    write_manifest(tmp_dir, manifest)                 # fills in file hashes, atomic

Every file name bundle.json holds (model files, golden images, the `files` table)
must be a plain name of a file in the bundle directory itself, so a tampered
bundle.json cannot make the runtime read or hash files elsewhere.

Schema history: 1 = edgekiln 0.1.0 (an untyped dict; per-artifact parity lived in
`parity.artifacts`, and artifacts had no `runtimes`); 2 = typed, one parity record per
artifact; 3 = this module: `default_artifact` / `default_backend` (the deployable that
export chose by measurement, which `runtime.load` opens when no artifact is named) and the
`deploy` record of that choice; 4 = `trust`: the calibration temperature the runtime divides the
logits by, and the out-of-distribution score and threshold below which it answers "unknown"
(runtime.trust). A rectangular model's `preprocess.resize` / `crop` are [h, w] pairs (still schema 4: a
runtime from before them refuses such a bundle in one line, "not an int", rather than misreading it).
`task: multilabel` with a `multilabel` section (per-label thresholds on the sigmoid of the logits,
runtime.multilabel) is optional too (still schema 4: a bundle without it is a multiclass one, as before).
Older bundles are upgraded in memory when they load (their default artifact is the FP32 ONNX model);
anything newer than this runtime knows is refused with one line saying how to re-export.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from runtime.bundle_upgrade import UPGRADES, upgrade
from runtime.errors import BundleError
from runtime.files import atomic_write_text, sha256_file
from runtime.preprocess import PreprocessSpec, size_hw
from runtime.signing import SIGNATURE_FILE

SCHEMA_VERSION = 4
BUNDLE_FILE = "bundle.json"
FORMAT = "edgekiln-bundle"

# The backends (runtime.backends) each artifact format runs on, best first; recorded per artifact.
DEFAULT_RUNTIMES: dict[str, list[str]] = {
    "onnx": ["cpu", "cuda", "tensorrt", "openvino"],
    "tensorrt": ["tensorrt-engine"],
    "openvino": ["openvino"],  # OpenVINO IR (model.xml + its .bin)
}


def check_file_name(name: str) -> str:
    """A plain file name inside the bundle directory: no directories, no '..', not absolute."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ValueError(f"file name {name!r} must be a plain name of a file inside the bundle directory")
    return name


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Model):
    name: str
    shape: list[int | str]
    dtype: str = "float32"


class Preprocess(_Model):
    """How the runtime turns an image into the model's input (runtime.preprocess.PreprocessSpec):
    `resize` and `crop` are ints for a square input, [height, width] pairs for a rectangular one."""

    resize: int | tuple[int, int]
    crop: int | tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: Literal["nearest", "bilinear", "bicubic"] = "bilinear"
    color: Literal["RGB"] = "RGB"
    layout: Literal["NCHW"] = "NCHW"
    scale: Literal["1/255"] = "1/255"

    @field_validator("resize", "crop")
    @classmethod
    def _positive(cls, v: int | tuple[int, int]) -> int | tuple[int, int]:
        if min(size_hw(v)) <= 0:
            raise ValueError(f"sizes must be positive, got {v}")
        return v

    @model_validator(mode="after")
    def _same_kind(self) -> "Preprocess":
        self.spec  # resize and crop both square or both rectangular  # noqa: B018
        return self

    @classmethod
    def of(cls, spec: PreprocessSpec) -> "Preprocess":
        return cls(**spec.to_dict())

    @property
    def spec(self) -> PreprocessSpec:
        return PreprocessSpec.from_dict(self.model_dump())


class FileEntry(_Model):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class Artifact(_Model):
    """One deployable model file of the bundle, keyed by name in `BundleManifest.artifacts`
    (onnx, onnx_fp16, onnx_int8, tensorrt, ...: exporters.builders names them)."""

    file: str
    format: str  # "onnx" | "tensorrt" | ... (a key of DEFAULT_RUNTIMES)
    precision: Literal["fp32", "fp16", "int8", "bf16"] = "fp32"  # bf16: an FP32 model run with bf16 inference
    runtimes: list[str] = Field(default_factory=list)  # backends it runs on, best first
    parity: dict[str, Any] | None = None  # its record in the parity gate (exporters.parity.ParityReport)
    fingerprint: dict[str, str] | None = None  # the machine a native engine was built for
    details: dict[str, Any] = Field(default_factory=dict)  # what its builder records (quantization, profile, ...)

    @field_validator("file")
    @classmethod
    def _file(cls, v: str) -> str:
        return check_file_name(v)

    @model_validator(mode="before")
    @classmethod
    def _default_runtimes(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("runtimes"):
            data = {**data, "runtimes": list(DEFAULT_RUNTIMES.get(data.get("format"), []))}
        return data


class GoldenOutputs(_Model):
    """One reduced-precision artifact's own logits on the golden images, as export ran it, and how
    far another runtime may move them: its distance from the FP32 logits (at least the FP32 atol)."""

    logits: list[list[float]]
    atol: float = Field(gt=0)


class Golden(_Model):
    """A few held-out images with their PyTorch logits, for any runtime's self-test. An INT8 or FP16
    artifact is held to its own export-time logits (`artifacts`), not to FP32's atol."""

    files: list[str] = Field(min_length=1)
    logits: list[list[float]]
    atol: float = Field(1e-4, gt=0)
    artifacts: dict[str, GoldenOutputs] = Field(default_factory=dict)

    @field_validator("files")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        return [check_file_name(f) for f in v]

    @model_validator(mode="after")
    def _shape(self) -> "Golden":
        for rows in [self.logits, *(o.logits for o in self.artifacts.values())]:
            if len(rows) != len(self.files) or len({len(r) for r in rows}) > 1:
                raise ValueError(f"{len(self.files)} files but logits of {len(rows)} rows of unequal or other length")
        return self

    def expected(self, artifact: str | None = None) -> tuple[list[list[float]], float]:
        """(logits, atol) that `artifact` is held to: its own when recorded, else FP32's."""
        own = self.artifacts.get(artifact) if artifact else None
        return (own.logits, own.atol) if own else (self.logits, self.atol)


class ModelInfo(BaseModel):
    """What was exported: architecture and role, plus whatever the checkpoint recorded."""

    model_config = ConfigDict(extra="allow", frozen=True)
    arch: str
    role: Literal["teacher", "student"]
    params: int | None = None


class ParitySummary(_Model):
    """The parity gate's verdict for the whole bundle (per-artifact records live on each artifact)."""

    passed: bool
    test: dict[str, Any] = Field(default_factory=dict)  # the primary (FP32 ONNX) artifact's report
    golden: dict[str, Any] = Field(default_factory=dict)  # the golden-image self-test


class OODSpec(_Model):
    """When the runtime answers "unknown": `score` (computed from the logits, runtime.trust.ood_score;
    higher = more like the training data) below `threshold`, which export chose on the validation
    split so that `target_recall` of in-distribution images stay known."""

    score: Literal["energy", "max_logit"] = "energy"
    threshold: float
    target_recall: float = Field(0.95, gt=0, le=1)
    unknown_label: str = Field("unknown", min_length=1)


class Trust(_Model):
    """How the runtime turns logits into an answer (runtime.trust.postprocess, the one path every backend
    and the server use): probabilities = softmax(logits / temperature); with `ood`, a score and "unknown"
    below its threshold. `fit` records how export chose them (split, n, ECE before/after, OOD figures)."""

    temperature: float = Field(1.0, gt=0)
    # vector scaling (Guo et al., 2017): probabilities = softmax(logits * scale + bias), one value per class;
    # when set, they replace the temperature (which then only records the 1-D fit they started from)
    scale: list[float] | None = None
    bias: list[float] | None = None
    ood: OODSpec | None = None
    fit: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _vector(self) -> "Trust":
        if (self.scale is None) != (self.bias is None) or (self.scale and len(self.scale) != len(self.bias)):
            raise ValueError("vector scaling needs `scale` and `bias` of the same length (one value per class)")
        return self


class MultiLabel(_Model):
    """How the runtime answers for task multilabel (runtime.multilabel.decide): the label set = every
    label whose sigmoid(logit) reaches its threshold, one per class, which export chose on the validation
    split to maximise each label's F1. `fit` records how (split, n, the F1 each reached)."""

    thresholds: list[float] = Field(min_length=1)
    fit: dict[str, Any] = Field(default_factory=dict)

    @field_validator("thresholds")
    @classmethod
    def _in_unit_interval(cls, v: list[float]) -> list[float]:
        if any(not 0.0 <= t <= 1.0 for t in v):
            raise ValueError("multilabel thresholds are probabilities, each in [0, 1]")
        return v


class BundleManifest(_Model):
    """bundle.json, schema version 4."""

    schema_version: Literal[4] = SCHEMA_VERSION
    format: Literal["edgekiln-bundle"] = FORMAT
    edgekiln_version: str
    created: str
    model: ModelInfo
    class_names: list[str] = Field(min_length=1)
    preprocess: Preprocess
    input: TensorSpec
    output: TensorSpec
    opset: int | None = None
    export_spec: str = "generic"
    artifacts: dict[str, Artifact] = Field(min_length=1)
    golden: Golden | None = None
    parity: ParitySummary | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    default_artifact: str = "onnx"  # the key `runtime.load` opens when none is named (export's measured choice)
    default_backend: str | None = None  # the backend it was measured best on (a record; `auto` decides per machine)
    deploy: dict[str, Any] | None = None  # how export chose it (exporters.deploy: budgets, objective, figures, why)
    trust: Trust | None = None  # calibration and the "unknown" answer (None: raw softmax, never unknown)
    task: Literal["multiclass", "multilabel"] = "multiclass"
    multilabel: MultiLabel | None = None  # task multilabel: per-label thresholds (runtime.multilabel)
    files: dict[str, FileEntry] = Field(default_factory=dict)

    @field_validator("files")
    @classmethod
    def _file_names(cls, v: dict[str, FileEntry]) -> dict[str, FileEntry]:
        for name in v:
            check_file_name(name)
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "BundleManifest":
        if self.golden and any(len(r) != len(self.class_names) for r in self.golden.logits):
            raise ValueError(f"golden logits must have {len(self.class_names)} columns, one per class")
        unknown = sorted(set(self.golden.artifacts) - set(self.artifacts)) if self.golden else []
        if unknown:
            raise ValueError(f"golden outputs for unknown artifacts: {', '.join(unknown)}")
        if self.trust and self.trust.scale is not None and len(self.trust.scale) != len(self.class_names):
            raise ValueError(f"trust.scale and trust.bias must have {len(self.class_names)} values, one per class")
        if self.trust and self.trust.ood and self.trust.ood.unknown_label in self.class_names:
            raise ValueError(f"trust.ood.unknown_label '{self.trust.ood.unknown_label}' is also a class name")
        if (self.task == "multilabel") != (self.multilabel is not None):
            raise ValueError("task multilabel and a `multilabel` section (its thresholds) go together")
        if self.multilabel is not None and len(self.multilabel.thresholds) != len(self.class_names):
            raise ValueError(f"multilabel.thresholds must have {len(self.class_names)} values, one per class")
        if self.multilabel is not None and self.trust is not None:
            raise ValueError("a multilabel bundle has no `trust` section (calibration and OOD are softmax figures)")
        if self.default_artifact not in self.artifacts:
            raise ValueError(f"default_artifact '{self.default_artifact}' is not one of the artifacts "
                             f"({', '.join(self.artifacts)})")
        return self

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2) + "\n"


def parse_manifest(meta: Any, where: str | os.PathLike = BUNDLE_FILE) -> BundleManifest:
    """Validate a parsed bundle.json (any supported schema version) into a BundleManifest."""
    if not isinstance(meta, dict):
        raise BundleError(f"{where}: not an edgekiln bundle manifest (a JSON object was expected)")
    version = meta.get("schema_version")
    made_by = meta.get("edgekiln_version", "an unknown edgekiln version")
    if version in UPGRADES:
        meta = upgrade(meta, version)
    elif version != SCHEMA_VERSION:
        raise BundleError(
            f"{where}: bundle schema_version {version!r} (written by edgekiln {made_by}) is not supported by this "
            f"runtime, which reads versions 1 to {SCHEMA_VERSION}; re-export it with this edgekiln "
            "(edgekiln export CONFIG) or upgrade the runtime"
        )
    try:
        return BundleManifest.model_validate(meta)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}" for err in e.errors())
        raise BundleError(f"{where}: bad bundle.json (schema {version}, edgekiln {made_by}): {problems}; "
                          "re-export the bundle (edgekiln export CONFIG)") from None


@dataclass(frozen=True)
class Bundle:
    """A bundle directory and its parsed manifest."""

    root: Path
    manifest: BundleManifest

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest.class_names)

    @property
    def preprocess(self) -> PreprocessSpec:
        return self.manifest.preprocess.spec

    @property
    def input_name(self) -> str:
        return self.manifest.input.name

    @property
    def output_name(self) -> str:
        return self.manifest.output.name

    def artifact(self, key: str = "onnx") -> Artifact:
        arts = self.manifest.artifacts
        if key not in arts:
            raise BundleError(f"{self.root}: bundle has no '{key}' artifact (has: {', '.join(sorted(arts)) or 'none'})")
        return arts[key]

    def file(self, name: str) -> Path:
        """Path of a file named in bundle.json, refused when it would lie outside the bundle."""
        try:
            check_file_name(name)
        except ValueError as e:
            raise BundleError(f"{self.root}: {e}") from None
        path = self.root / name
        if path.resolve().parent != self.root.resolve():  # a symlink pointing out of the bundle
            raise BundleError(f"{self.root}: '{name}' lies outside the bundle")
        return path

    def path(self, key: str = "onnx") -> Path:
        """Path of an artifact, by its key in bundle.json's "artifacts" section."""
        return self.file(self.artifact(key).file)

    def golden(self, artifact: str | None = None) -> tuple[list[str], list[Path], np.ndarray, float]:
        """bundle.json's "golden" section, checked: (file names, their paths inside the bundle,
        expected logits as a float64 array of shape (files, classes), atol) for `artifact` (its own
        recorded logits when it has them, else FP32's). BundleError when the section is missing, or
        a file is missing or lies outside the bundle."""
        golden = self.manifest.golden
        if golden is None:
            raise BundleError(
                f"{self.root}: bundle has no golden images (no 'golden' section in bundle.json) to self-test against; "
                "re-export it with an edgekiln version that stores golden images"
            )
        paths = [self.file(name) for name in golden.files]
        for name, path in zip(golden.files, paths):
            if not path.is_file():
                raise BundleError(f"{self.root}: golden file '{name}' listed in bundle.json is missing")
        logits, atol = golden.expected(artifact)
        return list(golden.files), paths, np.asarray(logits, dtype=np.float64), float(atol)


def read_bundle(root: str | os.PathLike, verify: bool = True, public_key: str | os.PathLike | None = None) -> Bundle:
    """Load and validate bundle.json and (by default) check every listed file's sha256. With
    `public_key`, bundle.json must carry a valid signature by it (runtime.signing), checked on the
    very bytes that are then parsed."""
    root = Path(root)
    meta_path = root / BUNDLE_FILE
    if not meta_path.is_file():
        raise BundleError(f"{root}: not a bundle (no {BUNDLE_FILE})")
    data = meta_path.read_bytes()
    if public_key is not None:
        from runtime.signing import verify_signature

        verify_signature(data, root, public_key)
    try:
        meta = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{meta_path}: not valid JSON ({e})") from None
    bundle = Bundle(root=root, manifest=parse_manifest(meta, meta_path))
    if verify:
        verify_files(bundle)
    return bundle


def verify_files(bundle: Bundle) -> None:
    """Every file bundle.json lists exists inside the bundle with its recorded sha256."""
    for name, entry in bundle.manifest.files.items():
        p = bundle.file(name)
        if not p.is_file():
            raise BundleError(f"{bundle.root}: file '{name}' listed in {BUNDLE_FILE} is missing")
        digest = sha256_file(p)
        if digest != entry.sha256:
            raise BundleError(
                f"{p}: sha256 mismatch (expected {entry.sha256[:12]}…, got {digest[:12]}…); "
                "the file was modified after export — re-export the bundle"
            )


def write_manifest(root: Path, manifest: BundleManifest) -> BundleManifest:
    """Record the sha256 of every file in `root` (except bundle.json and hidden files), check that
    every file the manifest names exists, and write bundle.json atomically. Returns what was written."""
    root = Path(root)
    # bundle.json's signature (runtime.signing) signs the table, so it cannot be in it
    files = {p.name: FileEntry(sha256=sha256_file(p), bytes=p.stat().st_size) for p in sorted(root.iterdir())
             if p.is_file() and p.name not in (BUNDLE_FILE, SIGNATURE_FILE) and not p.name.startswith(".")}
    named = [a.file for a in manifest.artifacts.values()] + (manifest.golden.files if manifest.golden else [])
    missing = [n for n in named if n not in files]
    if missing:
        raise BundleError(f"{root}: bundle.json names files that are not in the bundle: {', '.join(missing)}")
    manifest = manifest.model_copy(update={"files": files, "schema_version": SCHEMA_VERSION, "format": FORMAT})
    atomic_write_text(root / BUNDLE_FILE, manifest.to_json())
    return manifest
