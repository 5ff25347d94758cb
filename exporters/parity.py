"""One parity routine for every artifact: compare PyTorch logits with an
artifact's logits on the same labeled images, collect every failed check."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from pipeline.errors import ParityError


@dataclass(frozen=True)
class Thresholds:
    min_agreement: float = 1.0
    max_abs_logit_diff: float | None = 1e-3
    min_accuracy: float | None = None


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
) -> ParityReport:
    """Accuracy of each, top-1 agreement, |Δlogit|; every violated threshold becomes a failure line."""
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
    t = thresholds
    if report.agreement < t.min_agreement:
        shown = ", ".join(str(f["image"]) for f in report.flipped[:5])
        more = f" and {len(report.flipped) - 5} more" if len(report.flipped) > 5 else ""
        report.failures.append(
            f"top-1 agreement {report.agreement:.2%} < {t.min_agreement:.2%} ({len(report.flipped)} flipped: {shown}{more})"
        )
    if t.max_abs_logit_diff is not None and report.max_abs_logit_diff > t.max_abs_logit_diff:
        report.failures.append(f"max |Δlogit| {report.max_abs_logit_diff:.3g} > {t.max_abs_logit_diff:.3g}")
    if t.min_accuracy is not None and report.artifact_accuracy < t.min_accuracy:
        report.failures.append(f"accuracy {report.artifact_accuracy:.4f} < {t.min_accuracy:.4f}")
    return report
