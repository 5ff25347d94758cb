"""The one parity-thresholds type, and how the config's overrides resolve against an
architecture's defaults.

`Thresholds` is what the parity routine checks (exporters.parity.compare_logits) and what
every export spec declares per precision (exporters.specs). The config's `validate` section
(exporters.config.ValidateConfig, validated by pydantic at the edge) holds the user's sparse
overrides; `resolve_thresholds` lays them over the spec's values.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from exporters.config import ValidateConfig
    from exporters.specs import ExportSpec


@dataclass(frozen=True)
class Thresholds:
    """None disables a check. Accuracies are fractions (max_accuracy_drop 0.01 = 1 point)."""

    min_agreement: float | None = 1.0
    max_abs_logit_diff: float | None = 1e-3
    min_accuracy: float | None = None
    max_accuracy_drop: float | None = None
    max_kl: float | None = None
    # bundle.json's `trust` answers (runtime.trust): the same decision (label, or unknown) as PyTorch's
    # logits give through the same postprocessing, and how far calibrated probabilities and OOD scores move
    min_decision_agreement: float | None = None
    max_abs_prob_diff: float | None = None
    max_abs_score_diff: float | None = None

    @classmethod
    def only(cls, **checks: float) -> "Thresholds":
        """Just these checks, every other one disabled."""
        return cls(**{f.name: None for f in fields(cls)} | checks)


def resolve_thresholds(vcfg: "ValidateConfig", precision: str, spec: "type[ExportSpec] | None" = None) -> Thresholds:
    """The config's `validate` thresholds for `precision`, the architecture spec's where the config says None."""
    if spec is None:
        from exporters.specs import ExportSpec as spec
    tol = spec.tolerances[precision]
    if precision == "fp32":
        trust = {k: getattr(vcfg, k) for k in ("min_decision_agreement", "max_abs_prob_diff", "max_abs_score_diff")
                 if getattr(vcfg, k) is not None}
        return replace(tol, min_agreement=vcfg.min_agreement, max_abs_logit_diff=vcfg.max_abs_logit_diff,
                       min_accuracy=vcfg.min_accuracy, **trust)
    override = getattr(vcfg, precision)
    picked = {f.name: getattr(override, f.name) for f in fields(Thresholds) if getattr(override, f.name) is not None}
    if override.min_accuracy is None:
        picked["min_accuracy"] = vcfg.min_accuracy
    return replace(tol, **picked)
