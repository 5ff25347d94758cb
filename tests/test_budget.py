"""Training budgets in optimizer steps, sized to the data (pipeline.training.budget)."""

import pytest
import torch
import torch.nn.functional as F
import yaml
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.training import fit, kd_loss, tensor_loader
from pipeline.training.budget import fit_batch_size, plan_budget


def test_small_sets_get_the_step_floor_and_a_smaller_batch():
    # The failure this replaces: 124 images, batch 64, 15 epochs = 30 optimizer steps.
    b = plan_budget("distill", n_train=124, batch_size=64)
    assert b.batch_size == 16 and b.steps_per_epoch == 8
    assert b.steps >= 600 and b.epochs == b.steps // 8 and b.source == "auto"
    assert b.validate_every * 30 >= b.epochs  # about 30 validations, not one per epoch
    assert "sized to the data" in b.describe()


def test_large_sets_keep_the_batch_and_are_capped():
    b = plan_budget("finetune", n_train=300_000, batch_size=64)
    assert b.batch_size == 64 and b.epochs == 1 and b.steps <= 5_000 + b.steps_per_epoch
    digits = plan_budget("feature_extraction", n_train=1257, batch_size=64)
    assert (digits.batch_size, digits.steps_per_epoch, digits.epochs) == (64, 20, 30)


def test_configured_length_wins_and_both_is_an_error():
    assert plan_budget("distill", 124, 64, epochs=15).steps == 15 * 8
    assert plan_budget("distill", 124, 64, steps=100).epochs == round(100 / 8)
    with pytest.raises(ValueError, match="epochs or steps, not both"):
        plan_budget("distill", 124, 64, epochs=3, steps=10)
    assert fit_batch_size(10, 64) == 16 and fit_batch_size(10_000, 64) == 64


def test_epochs_and_steps_together_in_a_config_is_one_line_exit_2(tmp_path, tiny_data):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"root": str(tiny_data)}, "distill": {"epochs": 3, "steps": 10}}))
    r = CliRunner().invoke(cli, ["distill", str(cfg)])
    assert r.exit_code == 2
    assert "distill: set epochs or steps, not both" in r.output and len(r.output.strip().splitlines()) == 1


def test_validation_runs_every_k_epochs_and_on_the_last():
    torch.manual_seed(0)
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    from pipeline.training import TrainSettings

    res = fit(torch.nn.Linear(4, 2), tensor_loader(x, y, batch_size=8, shuffle=True), x, y,
              settings=TrainSettings(epochs=7, lr=0.01, validate_every=3))
    assert [h["epoch"] for h in res.history] == [3, 6, 7]


def test_kd_loss_unlabeled_rows_feed_only_the_kd_term():
    torch.manual_seed(0)
    s, t = torch.randn(6, 3), torch.randn(6, 3)
    y = torch.tensor([0, 1, -1, -1, 2, -1])
    known = y >= 0
    kd_only = kd_loss(s, t, y, 2.0, 1.0)
    full = kd_loss(s, t, y, 2.0, 0.5)
    assert torch.allclose(full, 0.5 * kd_only + 0.5 * F.cross_entropy(s[known], y[known]), atol=1e-6)
    none = torch.full((6,), -1)
    assert torch.allclose(kd_loss(s, t, none, 2.0, 0.5), 0.5 * kd_only, atol=1e-6)  # no labels: KD alone
    lam = torch.full((6,), 0.3)
    y2 = torch.tensor([1, 0, -1, -1, 0, -1])
    mixed = kd_loss(s, t, y, 2.0, 0.0, y2, lam)
    ce = 0.3 * F.cross_entropy(s[known], y[known], reduction="none") + 0.7 * F.cross_entropy(s[known], y2[known], reduction="none")
    assert torch.allclose(mixed, ce.mean(), atol=1e-6)
