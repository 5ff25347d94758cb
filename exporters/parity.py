"""One parity routine for every artifact: compare PyTorch logits with an
artifact's logits on the same labeled images, collect every failed check.

`compare_logits` is the routine (accuracy of each, accuracy delta, top-1
agreement, max and mean |Δlogit|, KL divergence of the probabilities,
per-class accuracy delta, flipped images); `parity_gate` runs every artifact of
a bundle through the runtime's own backends (runtime.backends.session_for_artifact,
the code that serves) and the runtime's preprocessing; `GateResult` collects the
reports of every artifact of a bundle.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from exporters.thresholds import Thresholds
from runtime import softmax
from runtime.backends import EngineUnavailable, session_for_artifact
from runtime.bundle import Bundle
from runtime.errors import ParityError
from runtime.preprocess import preprocess

log = logging.getLogger("edgekiln")

__all__ = ["GateResult", "ParityReport", "Thresholds", "compare_logits", "kl_divergence", "open_runners",
           "parity_gate"]


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


Runner = Callable[[np.ndarray], np.ndarray]


def open_runners(bundle: Bundle, keys: list[str] | None = None) -> tuple[dict[str, Runner], dict[str, str]]:
    """Every artifact of `bundle` (or `keys`) opened on the runtime backend its format needs, as
    float32 NCHW batch -> logits functions, and {key: why} for the engines that cannot run on
    this machine (left out with a warning)."""
    runners, skipped = {}, {}
    for key in keys if keys is not None else list(bundle.manifest.artifacts):
        try:
            runners[key] = session_for_artifact(bundle, key).run
        except EngineUnavailable as e:  # e.g. a TensorRT engine on a machine without tensorrt or this GPU
            log.warning("parity: %s not checked on this machine: %s", key, e)
            skipped[key] = str(e)
    return runners, skipped


def parity_gate(bundle: Bundle, reference: np.ndarray, labels: np.ndarray, paths: list[Path], names: list[str],
                thresholds_for: Callable[[str], Thresholds], batch: int = 64) -> GateResult:
    """Check every artifact of `bundle` against the PyTorch `reference` logits on the image files `paths`.

    Each chunk of images is decoded and preprocessed once (bundle.json's preprocessing) and fed to
    every artifact, and the golden-image self-test reuses the same sessions (each loads once).
    """
    from exporters.golden import self_test

    m = bundle.manifest
    runners, _ = open_runners(bundle)
    outs: dict[str, list[np.ndarray]] = {k: [] for k in runners}
    for i in range(0, len(paths), batch):
        x = preprocess(paths[i : i + batch], bundle.preprocess)
        for key, run in runners.items():
            outs[key].append(np.asarray(run(x), dtype=np.float32))
    reports = {}
    for key, chunks in outs.items():
        art = m.artifacts[key]
        cand = np.concatenate(chunks) if chunks else np.zeros((0, len(m.class_names)), np.float32)
        reports[key] = compare_logits(art.file, reference, cand, labels, thresholds_for(art.precision), names,
                                      precision=art.precision, class_names=list(m.class_names))
    golden = self_test(bundle, runners=runners) if m.golden else {}
    return GateResult(reports=reports, golden=golden)
