"""One parity routine for every artifact: compare PyTorch logits with an
artifact's logits on the same labeled images, collect every failed check.

`compare_logits` is the routine (accuracy of each, accuracy delta, top-1
agreement, max and mean |Δlogit|, KL divergence of the probabilities,
per-class accuracy delta, flipped images); `artifact_logits` runs any bundle
artifact on image files through the runtime's own preprocessing; `GateResult`
collects the reports of every artifact of a bundle.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ParityError
from runtime import softmax


@dataclass(frozen=True)
class Thresholds:
    """None disables a check. Accuracies are fractions (max_accuracy_drop 0.01 = 1 point)."""

    min_agreement: float | None = 1.0
    max_abs_logit_diff: float | None = 1e-3
    min_accuracy: float | None = None
    max_accuracy_drop: float | None = None
    max_kl: float | None = None


def kl_divergence(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Mean KL(p_reference || p_candidate) over images, in nats."""
    if not len(reference):
        return 0.0
    p, q = softmax(reference), softmax(candidate)
    eps = 1e-12
    return float(np.mean(np.sum(p * (np.log(p + eps) - np.log(q + eps)), axis=1)))


@dataclass
class ParityReport:
    artifact: str
    n_images: int
    reference_accuracy: float
    artifact_accuracy: float
    agreement: float
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    flipped: list[dict] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    precision: str = "fp32"
    accuracy_delta: float = 0.0
    kl_divergence: float = 0.0
    per_class_accuracy_delta: dict[str, float] = field(default_factory=dict)
    thresholds: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        d = asdict(self)
        d["passed"] = self.passed
        return d

    def raise_on_failure(self) -> None:
        if self.failures:
            raise ParityError(f"{self.artifact}: parity failed: " + "; ".join(self.failures))


def compare_logits(
    artifact: str,
    reference: np.ndarray,
    candidate: np.ndarray,
    labels: np.ndarray,
    thresholds: Thresholds,
    names: list[str] | None = None,
    precision: str = "fp32",
    class_names: list[str] | None = None,
) -> ParityReport:
    """Accuracy of each and their delta, top-1 agreement, |Δlogit|, KL divergence, per-class
    accuracy delta, flipped images; every violated threshold becomes a failure line."""
    reference = np.asarray(reference, dtype=np.float64)
    candidate = np.asarray(candidate, dtype=np.float64)
    labels = np.asarray(labels)
    if reference.shape != candidate.shape:
        raise ParityError(f"{artifact}: output shape {candidate.shape} differs from PyTorch's {reference.shape}")
    ref_top, cand_top = reference.argmax(1), candidate.argmax(1)
    diff = np.abs(reference - candidate)
    flipped_idx = np.nonzero(ref_top != cand_top)[0]
    report = ParityReport(
        artifact=artifact,
        n_images=len(labels),
        reference_accuracy=float((ref_top == labels).mean()),
        artifact_accuracy=float((cand_top == labels).mean()),
        agreement=float((ref_top == cand_top).mean()),
        max_abs_logit_diff=float(diff.max()) if diff.size else 0.0,
        mean_abs_logit_diff=float(diff.mean()) if diff.size else 0.0,
        precision=precision,
        kl_divergence=kl_divergence(reference, candidate),
        thresholds={k: v for k, v in asdict(thresholds).items() if v is not None},
        flipped=[
            {
                "image": names[i] if names else int(i),
                "label": int(labels[i]),
                "pytorch": int(ref_top[i]),
                "artifact": int(cand_top[i]),
            }
            for i in flipped_idx
        ],
    )
    report.accuracy_delta = report.artifact_accuracy - report.reference_accuracy
    n_classes = reference.shape[1] if reference.ndim == 2 else 0
    for c in range(n_classes):
        mask = labels == c
        if mask.any():
            key = class_names[c] if class_names else str(c)
            report.per_class_accuracy_delta[key] = float((cand_top[mask] == c).mean() - (ref_top[mask] == c).mean())
    t = thresholds
    if t.min_agreement is not None and report.agreement < t.min_agreement:
        shown = ", ".join(str(f["image"]) for f in report.flipped[:5])
        more = f" and {len(report.flipped) - 5} more" if len(report.flipped) > 5 else ""
        report.failures.append(
            f"top-1 agreement {report.agreement:.2%} < {t.min_agreement:.2%} ({len(report.flipped)} flipped: {shown}{more})"
        )
    if t.max_abs_logit_diff is not None and report.max_abs_logit_diff > t.max_abs_logit_diff:
        report.failures.append(f"max |Δlogit| {report.max_abs_logit_diff:.3g} > {t.max_abs_logit_diff:.3g}")
    if t.min_accuracy is not None and report.artifact_accuracy < t.min_accuracy:
        report.failures.append(f"accuracy {report.artifact_accuracy:.4f} < {t.min_accuracy:.4f}")
    drop = -report.accuracy_delta
    if t.max_accuracy_drop is not None and drop > t.max_accuracy_drop + 1e-12:
        report.failures.append(
            f"accuracy drop {drop * 100:.2f} points > {t.max_accuracy_drop * 100:.2f} "
            f"({report.reference_accuracy:.4f} -> {report.artifact_accuracy:.4f}; {len(report.flipped)} flipped)"
        )
    if t.max_kl is not None and report.kl_divergence > t.max_kl:
        report.failures.append(f"KL divergence {report.kl_divergence:.3g} > {t.max_kl:.3g}")
    return report


@dataclass
class GateResult:
    """The parity gate over every artifact of a bundle (keyed like bundle.json's "artifacts")."""

    reports: dict[str, ParityReport]
    golden: dict[str, Any] = field(default_factory=dict)

    @property
    def primary(self) -> ParityReport:
        return self.reports.get("onnx") or next(iter(self.reports.values()))

    @property
    def failures(self) -> list[str]:
        out = [f"{f} [{key}]" if len(self.reports) > 1 else f for key, r in self.reports.items() for f in r.failures]
        out += [f"golden self-test: {f}" for f in self.golden.get("failures", [])]
        return out

    @property
    def passed(self) -> bool:
        return not self.failures

    # The primary report's figures, so callers written for one artifact keep working.
    def __getattr__(self, name: str):
        if name in ParityReport.__dataclass_fields__:
            return getattr(self.primary, name)
        raise AttributeError(name)

    def to_dict(self) -> dict:
        return {**self.primary.to_dict(), "passed": self.passed,
                "artifacts": {k: r.to_dict() for k, r in self.reports.items()}, "golden": self.golden}


def artifact_session(path: Path, providers: list[str] | None = None):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=providers or ["CPUExecutionProvider"])


def artifact_runner(bundle_root: Path, meta: dict, key: str):
    """A function float32 NCHW batch -> float32 logits for the bundle artifact `key`."""
    art = meta["artifacts"][key]
    path = Path(bundle_root) / art["file"]
    if art["format"] == "onnx":
        sess = artifact_session(path)
        in_name, out_name = meta["input"]["name"], meta["output"]["name"]
        return lambda x: np.asarray(sess.run([out_name], {in_name: x})[0], dtype=np.float32)
    if art["format"] == "tensorrt":
        from exporters.tensorrt import TensorRTRunner

        # Refuses an engine whose fingerprint (TensorRT version, GPU, compute capability) is not this machine's.
        return TensorRTRunner(path, meta["input"]["name"], meta["output"]["name"], fingerprint=art.get("fingerprint"))
    raise ParityError(f"{path}: no runner for artifact format '{art['format']}'")


def artifact_logits(bundle_root: Path, meta: dict, key: str, images: list, batch: int = 64) -> np.ndarray:
    """Logits of artifact `key` on image files, preprocessed exactly as the runtime does (bundle.json)."""
    from runtime.preprocess import PreprocessSpec, preprocess

    spec = PreprocessSpec.from_dict(meta["preprocess"])
    run = artifact_runner(bundle_root, meta, key)
    outs = [run(preprocess(images[i : i + batch], spec)) for i in range(0, len(images), batch)]
    return np.concatenate(outs) if outs else np.zeros((0, len(meta["class_names"])), np.float32)
