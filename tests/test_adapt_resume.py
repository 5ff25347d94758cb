"""A NaN/inf loss stops the run and keeps the last good checkpoint; Ctrl-C leaves a
resumable checkpoint, and resuming ends exactly where an uninterrupted run ends."""

import pytest
import torch
import torch.nn.functional as F
import yaml
from click.testing import CliRunner
from torch import nn

from pipeline.training import (
    TrainingDiverged,
    TrainingInterrupted,
    TrainSettings,
    fit,
    load_resume_state,
    tensor_loader,
)
from tests.conftest import tiny_config_dict

SETTINGS = TrainSettings(epochs=4, lr=0.05, optimizer="sgd", warmup_epochs=1, label_smoothing=0.1, grad_clip=1.0)


def _problem(seed=0):
    """The same data every time; `seed` sets the initial weights and the shuffling."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))
    return model, tensor_loader(x[:32], y[:32], batch_size=8, shuffle=True, seed=seed), x[32:], y[32:]


def _failing_loss(fail_at_step: int, exc):
    step = [0]

    def loss(out, y):
        step[0] += 1
        if step[0] == fail_at_step:
            if exc is None:
                return out.sum() * float("nan")
            raise exc
        return F.cross_entropy(out, y, label_smoothing=SETTINGS.label_smoothing)

    return loss


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path):
    model, loader, vx, vy = _problem()
    with pytest.raises(TrainingDiverged) as e:
        fit(model, loader, vx, vy, _failing_loss(10, None), settings=SETTINGS, checkpoint_dir=tmp_path)  # 4 steps/epoch
    assert str(e.value) == (
        f"loss became nan at epoch 3, step 2; training stopped. The last good checkpoint is from epoch 2 ({tmp_path}). "
        "Lower adapt.lr (now 0.05) or set adapt.grad_clip, then run again"
    )
    state, weights, _ = load_resume_state(tmp_path)
    assert state["epoch"] == 2 and len(state["history"]) == 2
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_ctrl_c_leaves_a_resumable_checkpoint_and_resume_matches_an_uninterrupted_run(tmp_path):
    model, loader, vx, vy = _problem()
    ref = fit(model, loader, vx, vy, settings=SETTINGS)
    ref_state = {k: v.clone() for k, v in model.state_dict().items()}

    model, loader, vx, vy = _problem()
    with pytest.raises(TrainingInterrupted) as e:
        fit(model, loader, vx, vy, _failing_loss(11, KeyboardInterrupt()), settings=SETTINGS, checkpoint_dir=tmp_path)
    assert e.value.exit_code == 130
    assert str(e.value) == (
        f"interrupted in epoch 3; a resumable checkpoint (epoch 2) is in {tmp_path}. Continue with: edgekiln adapt CONFIG --resume"
    )
    model, loader, vx, vy = _problem(seed=1)  # other initial weights and shuffling: all must come from the checkpoint
    res = fit(model, loader, vx, vy, settings=SETTINGS, checkpoint_dir=tmp_path, resume=True)
    assert res.resumed_from == 3
    drop = lambda hist: [{k: v for k, v in h.items() if k != "seconds"} for h in hist]  # noqa: E731
    assert drop(res.history) == drop(ref.history) and len(res.history) == 4
    assert (res.best_epoch, res.best_val_accuracy) == (ref.best_epoch, ref.best_val_accuracy)
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref_state[k]), k


def test_early_stopping_restores_the_best_epoch():
    model, loader, vx, vy = _problem()
    res = fit(model, loader, vx, vy, settings=TrainSettings(epochs=30, lr=0.05, patience=2))
    assert res.stopped_early and len(res.history) == res.best_epoch + 2
    with torch.no_grad():
        acc = float((model.eval()(vx).argmax(1) == vy).float().mean())
    assert acc == res.best_val_accuracy


def test_cli_ctrl_c_then_resume(tiny_data, tmp_path, monkeypatch):
    from pipeline.cli import cli
    from pipeline.training import loop

    d = tiny_config_dict(tiny_data, tmp_path / "runs")
    d["adapt"] = {"epochs": 6}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(d))
    run = tmp_path / "runs" / "tiny"

    r = CliRunner().invoke(cli, ["adapt", str(cfg), "--resume"])
    assert r.exit_code == 1
    assert r.output == f"error: no resumable checkpoint in {run / 'checkpoints' / 'adapt-resume'}; run without --resume to start training\n"

    real = loop.train_one_epoch
    calls = []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(loop, "train_one_epoch", interrupted)
    r = CliRunner().invoke(cli, ["adapt", str(cfg)])
    assert r.exit_code == 130
    assert r.output == (
        f"error: interrupted in epoch 4; a resumable checkpoint (epoch 3) is in {run / 'checkpoints' / 'adapt-resume'}. "
        "Continue with: edgekiln adapt CONFIG --resume\n"
    )
    assert not (run / "checkpoints" / "teacher.safetensors").exists()
    monkeypatch.setattr(loop, "train_one_epoch", real)
    r = CliRunner().invoke(cli, ["adapt", str(cfg), "--resume"])
    assert r.exit_code == 0, r.output
    assert (run / "checkpoints" / "teacher.safetensors").is_file()
    assert not (run / "checkpoints" / "adapt-resume").exists()
    import json

    hist = json.loads((run / "metrics.json").read_text())["teacher"]["history"]
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4, 5, 6]
