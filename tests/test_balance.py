"""data.balance: class-weighted cross-entropy and a balanced sampler, on imbalanced classes."""

from __future__ import annotations

import torch
from torch import nn

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


def test_weighted_kd_loss_weighs_the_labels_term_only():
    s, t = torch.randn(6, 3), torch.randn(6, 3)
    y = torch.tensor([0, 0, 0, 0, 1, 2])
    w = class_weights(y, 3)
    plain, weighted = kd_loss(s, t, y, 4.0, 0.0, weight=None), kd_loss(s, t, y, 4.0, 0.0, weight=w)
    assert torch.isclose(weighted, torch.nn.functional.cross_entropy(s, y, weight=w))
    assert not torch.isclose(plain, weighted)
    assert torch.isclose(kd_loss(s, t, y, 4.0, 1.0, weight=w), kd_loss(s, t, y, 4.0, 1.0))  # KD term unchanged


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
