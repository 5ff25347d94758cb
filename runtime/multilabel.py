"""Multi-label answers from logits (bundle.json's `task: multilabel`): an independent sigmoid per
label, and the label set = every label whose probability reaches its own threshold, which export
chose on the validation split (runtime.bundle.MultiLabel). The artifacts keep outputting plain
logits, so every precision and backend answers through this one path."""

from __future__ import annotations

import numpy as np


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-z)), without overflow warnings for large |z|."""
    z = np.asarray(logits, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -z))


def decide(logits: np.ndarray, thresholds) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (N, labels), decisions (N, labels) bool: probability >= the label's threshold)."""
    p = sigmoid(logits)
    return p, p >= np.asarray(thresholds, dtype=np.float64)
