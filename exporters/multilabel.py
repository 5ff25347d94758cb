"""Multi-label figures (numpy + scikit-learn, no torch): mean average precision, micro/macro F1 and
exact match of label sets, and the per-label thresholds export chooses on the validation split.

    thresholds = choose_thresholds(sigmoid(val_logits), val_targets)    # max F1 per label
    multilabel_metrics(test_logits, test_targets, names, thresholds)    # what metrics.json records

Targets are multi-hot (N, labels) arrays of 0/1."""

from __future__ import annotations

from typing import Any

import numpy as np

from runtime.multilabel import sigmoid


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Macro mAP: scikit-learn's average precision per label, averaged over the labels with at least
    one positive image (a label with none has no precision-recall curve); nan with no such label."""
    from sklearn.metrics import average_precision_score

    y = np.asarray(targets) > 0.5
    s = np.asarray(scores, dtype=np.float64)
    aps = [average_precision_score(y[:, c], s[:, c]) for c in range(y.shape[1]) if y[:, c].any()]
    return float(np.mean(aps)) if aps else float("nan")


def f1_scores(decisions: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """Micro- and macro-F1 (every label weighs the same; a label with no positive and no prediction
    counts 0, as scikit-learn's zero_division=0) and exact match (the whole label set right)."""
    from sklearn.metrics import f1_score

    y, d = np.asarray(targets) > 0.5, np.asarray(decisions, dtype=bool)
    if not len(y):
        return {"micro_f1": float("nan"), "macro_f1": float("nan"), "exact_match": float("nan")}
    return {"micro_f1": float(f1_score(y, d, average="micro", zero_division=0)),
            "macro_f1": float(f1_score(y, d, average="macro", zero_division=0)),
            "exact_match": float((y == d).all(axis=1).mean())}


def best_f1_threshold(probs: np.ndarray, positives: np.ndarray) -> float:
    """The threshold on one label's probabilities that maximises its F1 on these images: the midpoint
    between the lowest accepted probability and the next one below (so a nearby probability on another
    backend lands on the same side); 0.5 when the label has no positive image here."""
    p, y = np.asarray(probs, dtype=np.float64), np.asarray(positives) > 0.5
    if not y.any():
        return 0.5
    order = np.argsort(-p, kind="stable")
    ps, ys = p[order], y[order]
    tp = np.cumsum(ys)
    f1 = 2 * tp / (np.arange(1, len(p) + 1) + y.sum())
    cut = np.nonzero(ps[:-1] > ps[1:])[0]  # accept the first k+1 only where the probability strictly drops
    ks = np.append(cut, len(p) - 1)
    k = int(ks[np.argmax(f1[ks])])
    below = ps[k + 1] if k + 1 < len(ps) else 0.0
    return float((ps[k] + below) / 2)


def choose_thresholds(probs: np.ndarray, targets: np.ndarray) -> list[float]:
    """One threshold per label maximising that label's F1 on the validation images."""
    p, y = np.asarray(probs), np.asarray(targets)
    return [round(best_f1_threshold(p[:, c], y[:, c]), 6) for c in range(p.shape[1])]


def multilabel_metrics(logits: np.ndarray, targets: np.ndarray, class_names: list[str],
                       thresholds: list[float] | None = None) -> dict[str, Any]:
    """Every number the run report shows for one multilabel model on one split: mAP, micro/macro-F1
    and exact match at `thresholds` (default 0.5 for every label), per-label AP, precision, recall, F1."""
    from sklearn.metrics import average_precision_score, precision_recall_fscore_support

    p = sigmoid(logits)
    y = np.asarray(targets) > 0.5
    t = np.asarray(thresholds if thresholds is not None else [0.5] * len(class_names))
    d = p >= t
    prec, rec, f1, support = precision_recall_fscore_support(y, d, zero_division=0) if len(y) else ([0] * 4,) * 4
    return {
        "map": mean_average_precision(p, y), **f1_scores(d, y),
        "thresholds": "validation" if thresholds is not None else 0.5,
        "per_class": {
            name: {"ap": float(average_precision_score(y[:, i], p[:, i])) if len(y) and y[:, i].any() else None,
                   "precision": float(prec[i]), "recall": float(rec[i]), "f1": float(f1[i]),
                   "support": int(support[i])}
            for i, name in enumerate(class_names)
        },
    }
