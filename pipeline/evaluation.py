"""Classifier evaluation: accuracy, macro-F1, per-class precision/recall,
one-vs-rest AUC-ROC (scikit-learn), and the confusion-matrix and
training-curve plots (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> dict[str, Any]:
    """Every number the run report shows for one model on one split. Multi-hot `labels` (task
    multilabel): exporters.multilabel.multilabel_metrics at probability 0.5, with `accuracy` = its mAP
    (the figure the rest of the report reads as accuracy) and no confusion matrix."""
    if labels.ndim == 2:
        from exporters.multilabel import multilabel_metrics

        m = multilabel_metrics(logits.double().numpy(), labels.numpy(), class_names)
        return {**m, "accuracy": m["map"], "auc_roc_ovr": None, "confusion_matrix": []}
    from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support, roc_auc_score

    y = labels.numpy()
    n = len(class_names)
    probs = torch.softmax(logits.double(), 1).numpy()
    pred = probs.argmax(1)
    ids = list(range(n))
    prec, rec, f1, support = precision_recall_fscore_support(y, pred, labels=ids, zero_division=0)
    present = np.unique(y)
    auc = None
    if len(present) >= 2:
        # One-vs-rest per class; classes absent from `labels` have no ROC curve and are left out.
        per = [roc_auc_score(y == c, probs[:, c]) for c in present]
        auc = float(np.mean(per))
    return {
        "accuracy": float((pred == y).mean()) if len(y) else math.nan,
        "macro_f1": float(f1_score(y, pred, labels=ids, average="macro", zero_division=0)),
        "auc_roc_ovr": auc,
        "per_class": {
            name: {"precision": float(prec[i]), "recall": float(rec[i]), "f1": float(f1[i]), "support": int(support[i])}
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": confusion_matrix(y, pred, labels=ids).tolist(),
    }


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_confusion_matrix(cm: list[list[int]], class_names: list[str], path: Path, title: str = "") -> Path:
    plt = _pyplot()
    m = np.asarray(cm)
    n = len(class_names)
    side = min(12, 2.5 + 0.45 * n)
    fig, ax = plt.subplots(figsize=(side, side))
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(n), class_names, rotation=45 if n > 6 else 0, ha="right" if n > 6 else "center")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix (test)")
    if n <= 30:  # counts in the non-empty cells (text is the slow part of drawing)
        hi = m.max() if m.size else 0
        for i, j in zip(*np.nonzero(m)):
            ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=8, color="white" if m[i, j] > hi / 2 else "black")
    fig.tight_layout()
    _save(fig, path)
    return path


def plot_training_curves(curves: dict[str, list[dict]], path: Path) -> Path:
    """curves: label -> fit history (epoch, train_loss, val_loss, val_accuracy)."""
    plt = _pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for label, hist in curves.items():
        if not hist:
            continue
        ep = [h["epoch"] for h in hist]
        line = a1.plot(ep, [h["train_loss"] for h in hist], label=f"{label} train (as optimised)")[0]
        if "val_loss" in hist[0]:
            a1.plot(ep, [h["val_loss"] for h in hist], "--", color=line.get_color(), label=f"{label} val")
        a2.plot(ep, [h["val_accuracy"] for h in hist], color=line.get_color(), label=label)
    a1.set(xlabel="epoch", ylabel="loss", title="loss")
    a2.set(xlabel="epoch", ylabel="accuracy", title="validation accuracy")
    from matplotlib.ticker import MaxNLocator

    for a in (a1, a2):
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    return path


def plot_efficiency(table: dict[str, dict[str, float]], path: Path) -> Path:
    """table: method -> {shots: accuracy}; shots 'all' is drawn at the right end."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    keys = sorted({k for row in table.values() for k in row}, key=lambda k: (k == "all", int(k) if k != "all" else 0))
    xs = list(range(len(keys)))
    for method, row in table.items():
        pts = [(x, row[k]) for x, k in zip(xs, keys) if row.get(k) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    ax.set_xticks(xs, keys)
    ax.set(xlabel="labeled examples per class", ylabel="test accuracy", title="data efficiency", ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(fig, path)
    return path


def _save(fig, path: Path) -> None:
    from runtime.files import atomic_path

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=80, format="png")  # the temp name has no .png suffix to infer it from
    finally:
        _pyplot().close(fig)
