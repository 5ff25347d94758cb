"""The distillation losses: softmax KD (Hinton et al. 2015) and its sigmoid form for multi-label."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.training.balance import row_weights
from pipeline.training.loop import is_multilabel


def kd_loss(student_logits, teacher_logits, labels, temperature: float, alpha: float, labels2=None,
            lam=None, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Hinton et al. 2015: alpha * T^2 * KL(p_T(teacher) || p_T(student)) + (1 - alpha) * CE.

    The KL term needs no labels: rows labelled -1 (unlabeled images) feed it alone. With mixup,
    `labels2` and `lam` (per row) make the CE term lam * CE(labels) + (1 - lam) * CE(labels2).
    `weight` (data.balance: weights): class weights of both terms, each a weighted mean over the rows
    as torch's weighted cross-entropy is; the KL term weighs a row by its label's class weight (mixed
    rows by lam of each; unlabeled rows by 1), as the balanced sampler would draw it, so a balanced
    teacher's rare classes are not drowned by the common ones (class-balanced KD, Zhang et al. 2021).
    Multi-hot `labels` (task multilabel): `multilabel_kd_loss`."""
    if is_multilabel(labels):
        return multilabel_kd_loss(student_logits, teacher_logits, labels, temperature, alpha, labels2, lam)
    t = temperature
    kl_rows = F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                       reduction="none", log_target=True).sum(1)
    if weight is None:
        kl = kl_rows.mean()
    else:
        r = row_weights(labels, weight)
        if labels2 is not None:
            r = lam * r + (1 - lam) * row_weights(labels2, weight)
        kl = (r * kl_rows).sum() / r.sum().clamp(min=1e-12)
    if alpha >= 1.0:
        return (t * t) * kl
    known = labels >= 0 if labels2 is None else (labels >= 0) & (labels2 >= 0)
    if not known.any():
        ce = student_logits.sum() * 0.0
    elif labels2 is None:
        ce = F.cross_entropy(student_logits[known], labels[known], weight=weight)
    else:
        s, lk, l2k, w = student_logits[known], labels[known], labels2[known], lam[known]
        a = w if weight is None else w * weight[lk]
        b = (1 - w) if weight is None else (1 - w) * weight[l2k]
        ce = (a * F.cross_entropy(s, lk, reduction="none") + b * F.cross_entropy(s, l2k, reduction="none")).sum()
        ce = ce / (a + b).sum().clamp(min=1e-12)
    return alpha * (t * t) * kl + (1.0 - alpha) * ce


def multilabel_kd_loss(student_logits, teacher_logits, labels, temperature: float, alpha: float, labels2=None,
                       lam=None) -> torch.Tensor:
    """KD for independent sigmoid outputs: alpha * T^2 * BCE(student / T, sigmoid(teacher / T)) +
    (1 - alpha) * BCE(student, labels), each averaged over images and labels. The soft term is the
    binary KL to the teacher's tempered probabilities plus their (constant) entropy, so its gradient is
    the KL's; T^2 keeps its gradient scale as T changes, as in Hinton et al. Rows whose labels are -1
    (unlabeled images) feed the soft term alone; with mixup the label term is lam * BCE(labels) +
    (1 - lam) * BCE(labels2)."""
    t = temperature
    soft = F.binary_cross_entropy_with_logits(student_logits / t, torch.sigmoid(teacher_logits / t))
    if alpha >= 1.0:
        return (t * t) * soft
    known = (labels >= 0).all(1) if labels2 is None else (labels >= 0).all(1) & (labels2 >= 0).all(1)
    if not known.any():
        hard = student_logits.sum() * 0.0
    else:
        s = student_logits[known]
        hard = F.binary_cross_entropy_with_logits(s, labels[known], reduction="none").mean(1)
        if labels2 is not None:
            w = lam[known]
            hard = w * hard + (1 - w) * F.binary_cross_entropy_with_logits(s, labels2[known], reduction="none").mean(1)
        hard = hard.mean()
    return alpha * (t * t) * soft + (1.0 - alpha) * hard

