"""From logits to an answer the caller can trust: calibrated probabilities and "unknown".

The one postprocessing path every backend, `edgekiln predict`, the server and the parity gate use,
driven by bundle.json's `trust` section (runtime.bundle.Trust), so an artifact's graph stays the
plain logits model and every precision and backend answers the same way:

    out = postprocess(logits, bundle.manifest.trust)      # Outputs: probs, score, known
    out.probs      softmax(logits / temperature)           (temperature scaling, Guo et al. 2017)
                   or softmax(logits * scale + bias)       (vector scaling: may change the best class)
    out.score      the out-of-distribution score, higher = more like the training data
    out.known      score >= threshold (all True without an `ood` section, or with ood=False)

Scores are computed from the raw logits, not the temperature-scaled ones, so the threshold does not
move when the calibration is refitted: `energy` is logsumexp(logits) (the negative free energy, Liu et
al. 2020, https://arxiv.org/abs/2010.03759), `max_logit` the largest logit (Hendrycks et al. 2022).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.bundle import Trust


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def ood_score(logits: np.ndarray, kind: str = "energy") -> np.ndarray:
    """One score per row of `logits` (N, classes); higher means more in-distribution."""
    z = np.asarray(logits, dtype=np.float64)
    top = z.max(axis=-1)
    if kind == "max_logit":
        return top
    if kind == "energy":
        return top + np.log(np.exp(z - top[..., None]).sum(axis=-1))
    raise ValueError(f"unknown OOD score '{kind}' (valid: energy, max_logit)")


@dataclass(frozen=True)
class Outputs:
    """Calibrated probabilities (N, classes), the OOD score (N,) or None, and known (N,) bools."""

    probs: np.ndarray
    score: np.ndarray | None
    known: np.ndarray

    @property
    def decisions(self) -> np.ndarray:
        """The answer as a class index per row, -1 for "unknown": what the parity gate compares."""
        return np.where(self.known, self.probs.argmax(axis=-1), -1)


def postprocess(logits: np.ndarray, trust: Trust | None, ood: bool = True) -> Outputs:
    """Logits -> calibrated probabilities, OOD score and known/unknown, as bundle.json's `trust` says.
    `ood=False` turns the "unknown" answer off (the score is still computed when the bundle has one)."""
    z = np.asarray(logits, dtype=np.float32)
    temperature = trust.temperature if trust else 1.0
    if trust is not None and trust.scale is not None:  # vector scaling
        probs = softmax(z * np.asarray(trust.scale, np.float32) + np.asarray(trust.bias, np.float32))
    else:
        probs = softmax(z / np.float32(temperature)) if temperature != 1.0 else softmax(z)
    spec = trust.ood if trust else None
    score = ood_score(z, spec.score) if spec else None
    known = score >= spec.threshold if (spec and ood) else np.ones(len(z), dtype=bool)
    return Outputs(probs=probs, score=score, known=known)
