"""data.balance: class-weighted cross-entropy and a balanced sampler, on imbalanced classes."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.features import fit_logistic_regression

from pipeline.training import TrainSettings, balanced_sampler, class_weights, fit, kd_loss, tensor_loader


def _imbalanced(n_major=400, n_minor=40, seed=0):
    """Two overlapping Gaussian classes, 10:1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.randn(n_major, 2, generator=g), torch.randn(n_minor, 2, generator=g) + 1.5])
    y = torch.cat([torch.zeros(n_major, dtype=torch.long), torch.ones(n_minor, dtype=torch.long)])
    return x, y


def test_class_weights_are_inverse_frequency():
    y = torch.tensor([0] * 30 + [1] * 10 + [2] * 20 + [-1] * 5)  # -1: unlabeled rows are not counted
    w = class_weights(y, 4)
    assert torch.allclose(w, torch.tensor([60 / (4 * 30), 60 / (4 * 10), 60 / (4 * 20), 0.0]))


def test_balanced_sampler_draws_every_class_equally_often():
    y = torch.tensor([0] * 900 + [1] * 90 + [2] * 10)
    drawn = y[list(balanced_sampler(y, torch.Generator().manual_seed(0)))]
    assert len(drawn) == 1000
    share = torch.bincount(drawn, minlength=3).float() / len(drawn)
    assert torch.all((share - 1 / 3).abs() < 0.05), share
    loader = tensor_loader(torch.zeros(1000, 1), y, batch_size=100, shuffle=True, balance="sampler")
    assert abs(float(torch.cat([b[1] for b in loader]).eq(2).float().mean()) - 1 / 3) < 0.05


def _kl_rows(s, t, T):
    return F.kl_div(F.log_softmax(s / T, 1), F.log_softmax(t / T, 1), reduction="none", log_target=True).sum(1)


def test_weighted_kd_loss_weighs_both_terms_by_class():
    """data.balance: weights weighs the labels term (torch's weighted cross-entropy) and the KD term
    (each row by its label's class weight, an unlabeled row by 1), both as weighted means."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(7, 3, generator=g), torch.randn(7, 3, generator=g)
    y = torch.tensor([0, 0, 0, 0, 1, 2, -1])
    w = class_weights(y, 3)  # 6 labelled rows: 6/(3*4), 6/3, 6/3
    assert torch.allclose(w, torch.tensor([0.5, 2.0, 2.0]))
    T = 4.0
    ce = kd_loss(s, t, y, T, 0.0, weight=w)
    assert torch.isclose(ce, F.cross_entropy(s[:6], y[:6], weight=w))
    r = torch.tensor([0.5, 0.5, 0.5, 0.5, 2.0, 2.0, 1.0])
    kd = kd_loss(s, t, y, T, 1.0, weight=w)
    assert torch.isclose(kd, T * T * (r * _kl_rows(s, t, T)).sum() / r.sum())
    assert torch.isclose(kd_loss(s, t, y, T, 1.0), T * T * _kl_rows(s, t, T).mean())  # unweighted: batchmean
    assert not torch.isclose(kd, kd_loss(s, t, y, T, 1.0))
    ones = torch.ones(3)  # equal weights change nothing
    assert torch.isclose(kd_loss(s, t, y, T, 0.6, weight=ones), kd_loss(s, t, y, T, 0.6))


def test_weighted_kd_loss_with_mixup_is_a_weighted_mean():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    y, y2 = torch.tensor([0, 0, 1, 2]), torch.tensor([1, 0, 2, 0])
    lam, w, T = torch.full((4,), 0.7), torch.tensor([0.5, 2.0, 3.0]), 2.0
    a, b = lam * w[y], (1 - lam) * w[y2]
    ce = (a * F.cross_entropy(s, y, reduction="none") + b * F.cross_entropy(s, y2, reduction="none")).sum() / (a + b).sum()
    kl = ((a + b) * _kl_rows(s, t, T)).sum() / (a + b).sum()
    got = kd_loss(s, t, y, T, 0.25, labels2=y2, lam=lam, weight=w)
    assert torch.isclose(got, 0.25 * T * T * kl + 0.75 * ce)
    plain = kd_loss(s, t, y, T, 0.25, labels2=y2, lam=lam)  # no weights: the plain means, as before
    ce0 = (lam * F.cross_entropy(s, y, reduction="none") + (1 - lam) * F.cross_entropy(s, y2, reduction="none")).mean()
    assert torch.isclose(plain, 0.25 * T * T * _kl_rows(s, t, T).mean() + 0.75 * ce0)


def test_logistic_regression_head_honours_balance():
    """feature_extraction.head logistic_regression (and the linear-probe baseline) fit with the class
    weights under balance weights or sampler: the minority class's recall rises."""
    x, y = _imbalanced()
    vx, vy = _imbalanced(200, 200, seed=1)
    recall = {}
    for balance in ("none", "weights", "sampler"):
        w, b = fit_logistic_regression(x, y, 2, balance=balance)
        recall[balance] = float(((vx @ w.T + b).argmax(1)[vy == 1] == 1).float().mean())
    assert recall["none"] < 0.6 and recall["weights"] > recall["none"] + 0.2, recall
    assert recall["sampler"] == recall["weights"]


def _minority_recall(balance: str) -> float:
    x, y = _imbalanced()
    vx, vy = _imbalanced(200, 200, seed=1)  # balanced evaluation
    torch.manual_seed(0)
    model = nn.Linear(2, 2)
    weights = tuple(class_weights(y, 2).tolist()) if balance == "weights" else None
    fit(model, tensor_loader(x, y, batch_size=32, shuffle=True, balance=balance), vx, vy,
        settings=TrainSettings(epochs=15, lr=0.05, class_weights=weights), desc="t")
    pred = model(vx).argmax(1)
    return float((pred[vy == 1] == 1).float().mean())


def test_weights_and_sampler_raise_minority_recall():
    none, weights, sampler = _minority_recall("none"), _minority_recall("weights"), _minority_recall("sampler")
    assert none < 0.6 and weights > none + 0.2 and sampler > none + 0.2, (none, weights, sampler)


def test_macro_f1_selection_keeps_the_epoch_best_for_the_rare_class():
    """Selecting on macro-F1 keeps the epoch whose macro-F1 is the best of the history, and the
    reported val accuracy is that epoch's accuracy (not the selection score)."""
    x, y = _imbalanced()
    vx, vy = _imbalanced(200, 20, seed=1)  # imbalanced validation, as a stratified split gives
    torch.manual_seed(0)
    model = nn.Linear(2, 2)
    res = fit(model, tensor_loader(x, y, batch_size=32, shuffle=True), vx, vy,
              settings=TrainSettings(epochs=8, lr=0.05, select_metric="macro_f1"), desc="t")
    f1s = {h["epoch"]: h["val_macro_f1"] for h in res.history}
    best = max(f1s.values())
    assert f1s[res.best_epoch] == best
    assert res.best_val_accuracy == next(h["val_accuracy"] for h in res.history if h["epoch"] == res.best_epoch)


def test_prior_shift_favours_rare_classes_by_a_quarter_of_their_log_ratio():
    from pipeline.training.balance import PRIOR_SHIFT_TAU, prior_shift

    y = torch.tensor([0] * 100 + [1] * 10 + [2] * 10 + [-1] * 7)  # class 3: no training image
    s = prior_shift(y, 4)
    assert PRIOR_SHIFT_TAU == 0.25
    assert abs(float(s.mean())) < 1e-6  # centred: the logits keep their scale
    assert abs(float(s[1] - s[0]) - 0.25 * math.log(10)) < 1e-6
    assert s[1] == s[2] == s[3]  # an absent class gets the rarest class's shift
    assert torch.equal(prior_shift(torch.tensor([0, 1, 2, 3] * 5), 4), torch.zeros(4))  # balanced: no shift


def test_shift_to_rare_moves_the_saved_head_and_its_figures_together():
    """data.balance weights/sampler: the head's bias, the test logits and the val accuracy all carry the
    shift; balance none leaves the outcome as it was."""
    from pipeline.models import EdgeClassifier, ModelDefaults
    from pipeline.strategies import AdaptData, AdaptOutcome, shift_to_rare
    from pipeline.training.balance import prior_shift

    x, y = _imbalanced()
    vx, vy = _imbalanced(200, 200, seed=1)
    torch.manual_seed(0)
    head = nn.Linear(2, 2)
    fit(head, tensor_loader(x, y, batch_size=32, shuffle=True), vx, vy, settings=TrainSettings(epochs=5, lr=0.05), desc="t")
    model = EdgeClassifier(nn.Identity(), head, "toy", ModelDefaults()).eval()
    data = AdaptData({p: [] for p in AdaptData.PARTS}, {"train": y.tolist(), "val": vy.tolist(), "test": vy.tolist()},
                     None, ["a", "b"])
    data._memo["x", "val"] = vx  # what AdaptData.x would load from the val images
    with torch.no_grad():
        before_logits, before_bias = model(vx), head.bias.clone()
    before_acc = float((before_logits.argmax(1) == vy).float().mean())
    out = AdaptOutcome(model, before_logits.clone(), before_acc, None, 6)
    assert shift_to_rare(out, data, "none") is out
    shifted = shift_to_rare(out, data, "weights")
    shift = prior_shift(y, 2)
    assert torch.allclose(head.bias, before_bias + shift)
    assert torch.allclose(shifted.test_logits, before_logits + shift)
    with torch.no_grad():
        after = model(vx).argmax(1)
    assert shifted.val_accuracy == float((after == vy).float().mean()) != before_acc
    assert shifted.extra["prior_shift"] == {"tau": 0.25, "val_accuracy_before": before_acc}
    # on this balanced evaluation the shift raises the rare class's recall
    assert (after[vy == 1] == 1).float().mean() > (before_logits.argmax(1)[vy == 1] == 1).float().mean()
