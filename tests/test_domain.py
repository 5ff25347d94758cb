"""Domain adaptation (issue 16): config, each method on tiny data, the domain gap, negative transfer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torch import nn

from pipeline.config import build_config
from pipeline.errors import ConfigError


def _dusk_copy(src: Path, out: Path, labeled: bool) -> Path:
    """Every source image blurred, darkened and noised (a tiny target domain)."""
    rng = np.random.default_rng(0)
    for p in sorted(src.rglob("*.png")):
        im = Image.open(p).convert("RGB").resize((32, 32)).filter(ImageFilter.GaussianBlur(1.5))
        a = np.asarray(im).astype(float) * 0.4 + rng.normal(0, 8, (32, 32, 3))
        dst = out / p.parent.name / p.name if labeled else out / f"{p.parent.name}_{p.name}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(dst)
    return out


@pytest.fixture(scope="module")
def target_dirs(tiny_data, tmp_path_factory):
    base = tmp_path_factory.mktemp("target")
    return _dusk_copy(tiny_data, base / "flat", labeled=False), _dusk_copy(tiny_data, base / "labeled", labeled=True)


# --------------------------------------------------------------------------- config


def test_target_images_split_into_halves_that_never_overlap(tmp_path):
    """Distillation trains on the 'train' half of data.target; the student's gate and the OOD threshold
    use the 'check' half: disjoint, together every image, the same for the same seed."""
    from pipeline.domain.target import target_paths

    for i in range(9):
        Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(tmp_path / f"t{i}.png")
    every = target_paths(tmp_path, seed=3)
    train, check = target_paths(tmp_path, 3, "train"), target_paths(tmp_path, 3, "check")
    assert len(every) == 9 and len(check) == 4 and sorted(train + check) == every and not set(train) & set(check)
    assert target_paths(tmp_path, 3, "check") == check and target_paths(tmp_path, 4, "check") != check


def test_domain_defaults_to_auto_with_a_target_and_none_without():
    assert build_config({"data": {"root": "x", "target": "t"}}).adapt.domain == "auto"
    assert build_config({"data": {"root": "x"}}).adapt.domain == "none"
    assert build_config({"data": {"root": "x", "target": "t"}, "adapt": {"domain": "none"}}).adapt.domain == "none"


@pytest.mark.parametrize("raw, message", [
    ({"data": {"root": "x"}, "adapt": {"domain": "style"}},
     "config: <root>: adapt.domain 'style' needs data.target (a folder of unlabeled deployment images)"),
    ({"data": {"root": "x", "target": "t"}, "adapt": {"domain": "simclr"}},
     "config: adapt.domain: Input should be 'none', 'style', 'adabn', 'dann', 'ssl' or 'auto'"),
    ({"data": {"root": "x", "target": "t"}, "adapt": {"domain": "dann"}},
     "config: <root>: adapt.domain 'dann' trains the backbone: set adapt.strategy: finetune"),
    ({"data": {"root": "x", "target_labeled": "t"}},
     "config: <root>: data.target_labeled needs data.target (the unlabeled deployment images)"),
])
def test_domain_config_errors_are_one_line(raw, message):
    with pytest.raises(ConfigError) as e:
        build_config(raw)
    assert str(e.value) == message


# --------------------------------------------------------------------------- methods


def test_adabn_changes_only_batchnorm_buffers_to_the_target_statistics():
    from pipeline.domain.adabn import adapt_batchnorm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(40, 3, 8, 8) * 3 + 2
    assert adapt_batchnorm(model, x, batch_size=16) == 2
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"1.running_mean", "1.running_var", "4.running_mean", "4.running_var", "1.num_batches_tracked",
                       "4.num_batches_tracked"}
    with torch.no_grad():
        h = model[0](x)
    # the cumulative average over batches of 16, 16, 8 weights each batch's mean equally (torch's momentum=None)
    means = torch.stack([h[i:i + 16].mean((0, 2, 3)) for i in (0, 16, 32)]).mean(0)
    assert torch.allclose(after["1.running_mean"], means, atol=1e-5)
    assert model[1].momentum == 0.1 and not model.training


def test_gradient_reversal_flips_and_scales_the_gradient():
    from pipeline.domain.dann import grad_reverse, grl_lambda

    x = torch.randn(5, 3, requires_grad=True)
    (grad_reverse(x, 0.25) * 2).sum().backward()
    assert torch.allclose(x.grad, torch.full((5, 3), -0.5))
    assert grl_lambda(0.0) == 0.0 and abs(grl_lambda(1.0) - 0.99991) < 1e-5 and abs(grl_lambda(0.5) - 0.98661) < 1e-5


def test_dann_wrapper_trains_a_domain_head_and_leaves_a_plain_model():
    from pipeline.domain.dann import DannWrapper, dann_loss
    from pipeline.models import create_model

    model = create_model("compact_cnn_w0.5", 3, "none")
    keys = set(model.state_dict())
    w = DannWrapper(model, total_steps=10).train()
    logits, dom = w(torch.randn(6, 3, 32, 32))
    assert logits.shape == (6, 3) and dom.shape == (6,) and int(w.step) == 1
    loss = dann_loss((logits, dom), torch.tensor([0, 1, 2, -1, -1, -1]))
    loss.backward()
    assert model.head.weight.grad is not None and w.domain_head[0].weight.grad is not None
    assert w.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 3) and set(model.state_dict()) == keys


def test_nt_xent_is_the_simclr_loss_by_hand():
    from pipeline.domain.ssl import nt_xent

    n, tau = 4, 0.2
    views = torch.eye(8)[:n]  # view pairs identical, other images orthogonal
    z = torch.cat([views, views])
    want = -np.log(np.exp(1 / tau) / (np.exp(1 / tau) + 2 * n - 2))
    assert abs(nt_xent(z, temperature=tau).item() - want) < 1e-5
    assert nt_xent(torch.cat([views, -views]), temperature=tau).item() > want + 5  # views apart: much worse


def test_ssl_warmup_trains_the_backbone_weights_only_and_leaves_a_plain_model():
    from pipeline.domain.ssl import SimCLRWrapper, ssl_warmup
    from pipeline.models import create_model, model_defaults

    torch.manual_seed(0)
    model = create_model("compact_cnn_w0.5", 3, "none")
    spec = model_defaults("compact_cnn_w0.5").preprocess(32, 1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(24, 3, 32, 32, generator=g) * 255).to(torch.uint8)
    info = ssl_warmup(model, x, spec, steps=12, batch_size=8, seed=0)
    after = model.state_dict()
    assert set(after) == set(before) and info["steps"] == 12 and info["images"] == 24
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert not any(k.startswith("head.") for k in changed)  # the classifier is trained later, on labels
    assert not any("running_" in k or "num_batches" in k for k in changed)  # pretrained BN statistics kept
    assert any(k.endswith("weight") for k in changed) and not model.training
    w = SimCLRWrapper(model).train()
    assert all(not m.training for m in w.modules() if isinstance(m, nn.BatchNorm2d))
    assert w(torch.randn(3, 2, 3, 32, 32)).shape == (6, 128)


def test_style_moves_the_source_statistics_toward_the_target():
    from pipeline.domain.style import domain_stats, fit_style, style_images

    g = torch.Generator().manual_seed(0)
    src = (torch.rand(24, 3, 32, 32, generator=g) * 255).to(torch.uint8)  # bright, sharp
    tgt_f = torch.nn.functional.avg_pool2d(torch.rand(24, 3, 32, 32, generator=g), 3, 1, 1) * 0.3
    tgt_f = tgt_f + 0.03 * torch.randn(tgt_f.shape, generator=g) + torch.tensor([0.0, 0.0, 0.1]).view(1, 3, 1, 1)
    tgt = (tgt_f.clamp(0, 1) * 255).to(torch.uint8)  # dark, blurred, blue, noisy
    transfer, s, t = fit_style(src, tgt, seed=0)
    styled = domain_stats(style_images(src, transfer, 1, seed=0))
    assert t.blur_sigma > 0 and t.add_noise > 0
    for key in ("mean", "std"):
        for c in range(3):
            assert abs(getattr(styled, key)[c] - getattr(t, key)[c]) < 0.25 * abs(getattr(s, key)[c] - getattr(t, key)[c])
    assert abs(np.log(styled.sharpness / t.sharpness)) < 0.3 * abs(np.log(s.sharpness / t.sharpness))


def test_style_measures_blur_at_the_photos_scale_when_the_model_input_upsamples_them():
    """48-px photos blurred by sigma 1.5 px, both domains upsampled 4x to a 192-px input: the blur to add
    at the input is 6 px (measured at MEASURE_SIDE; at 192 px the Laplacian saw no difference)."""
    from torchvision.transforms.v2 import functional as TF

    from pipeline.domain.style import fit_style

    small = torch.rand(24, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    def up(x):
        return (TF.resize(x, [192, 192], antialias=True).clamp(0, 1) * 255).to(torch.uint8)
    _, _, t = fit_style(up(small), up(TF.gaussian_blur(small, [9, 9], [1.5, 1.5])))
    assert 5.0 <= t.blur_sigma <= 7.0


def _adapt_cfg(tiny_data, tmp_path, **data):
    return build_config({"name": "dom", "runs_dir": str(tmp_path / "runs"),
                         "data": {"root": str(tiny_data), "batch_size": 16, **{k: str(v) for k, v in data.items()}},
                         "model": {"name": "efficientnet_lite0", "input_size": 32, "crop_pct": 1.0},
                         "adapt": {"epochs": 10, "lr": 0.01}})


def test_auto_with_target_labels_picks_the_best_and_style_beats_source_only(tiny_data, target_dirs, tmp_path):
    from pipeline.adapt_stage import run_adapt
    from pipeline.checkpoint import load_checkpoint

    flat, labeled = target_dirs
    result = run_adapt(_adapt_cfg(tiny_data, tmp_path, target=flat, target_labeled=labeled))
    d = result.extra["domain"]
    accs = {k: c["target_accuracy"] for k, c in d["candidates"].items()}
    assert set(accs) == {"none", "style", "adabn"} and d["method"] == max(accs, key=accs.get)
    assert accs["style"] >= accs["none"] + 0.15  # tiny 3-class digits, blurred + darkened: 0.76 -> 1.00
    assert d["gap"]["accuracy"] > 0.9 and d["warnings"] == []
    model, _ = load_checkpoint(tmp_path / "runs" / "dom" / "checkpoints" / "teacher.safetensors")
    assert not any("domain" in k for k in model.state_dict())


def test_auto_without_target_labels_restyles_unless_the_gap_is_small(tiny_data, target_dirs, tmp_path):
    from pipeline.adapt_stage import run_adapt
    from pipeline.domain import choose_unlabeled
    from pipeline.domain.gap import SMALL_GAP, DomainGap

    result = run_adapt(_adapt_cfg(tiny_data, tmp_path, target=target_dirs[0]))
    d = result.extra["domain"]
    assert list(d["candidates"]) == [d["method"]] and d["target_accuracy"] is None
    assert d["gap"]["level"] == "large" and d["method"] == "style"  # the dusk copies: blurred, dark, noisy
    assert d["reason"].startswith("the domain gap is large (a domain classifier tells the cameras apart with ")
    method, why = choose_unlabeled(DomainGap(SMALL_GAP - 0.01, 0.3, 40, 40), 0.9)
    assert method == "none" and "under 70%" in why and "nothing to restyle" in why
    assert choose_unlabeled(DomainGap(SMALL_GAP, 0.3, 40, 40), 0.1)[0] == "style"


def test_domain_candidates_are_judged_with_the_balance_shift_applied_once(tiny_data, target_dirs, tmp_path, caplog):
    """data.balance weights with a target folder: each domain candidate gets the shift towards the rare
    classes before the target is judged, and the saved model is that candidate (not shifted again)."""
    import shutil

    from pipeline.adapt_stage import run_adapt
    from pipeline.checkpoint import load_checkpoint
    from pipeline.data import load_tensors
    from pipeline.rundir import RunDir, load_split
    from pipeline.training import predict_logits

    data = tmp_path / "imb"
    shutil.copytree(tiny_data, data)
    for f in sorted((data / "digit2").iterdir())[8:]:  # 15 / 15 / 8
        f.unlink()
    cfg = _adapt_cfg(data, tmp_path, target=target_dirs[0])
    cfg.data.balance = "weights"
    with caplog.at_level("INFO", logger="pipeline.strategies.registry"):
        result = run_adapt(cfg)
    d = result.extra["domain"]
    assert sum("the head's bias shifted" in r.getMessage() for r in caplog.records) == len(d["candidates"]) == 1
    assert result.extra["prior_shift"]["tau"] == 0.25
    assert d["candidates"][d["method"]]["val_accuracy"] == result.val_accuracy
    run = RunDir(tmp_path / "runs" / "dom")
    model, meta = load_checkpoint(run.checkpoint("teacher"))
    split = load_split(run)
    vx, vy = load_tensors(split.paths("val"), split.labels("val"), meta.preprocess)
    assert float((predict_logits(model, vx).argmax(1) == vy).float().mean()) == result.val_accuracy


def test_ssl_through_adapt_warms_up_then_trains_and_checkpoints_a_plain_model(tiny_data, target_dirs, tmp_path):
    from pipeline.adapt_stage import run_adapt
    from pipeline.checkpoint import load_checkpoint

    cfg = _adapt_cfg(tiny_data, tmp_path, target=target_dirs[0])
    cfg.adapt.domain, cfg.adapt.ssl_steps = "ssl", 4
    result = run_adapt(cfg)
    d = result.extra["domain"]
    assert d["method"] == "ssl" and list(d["candidates"]) == ["ssl"] and d["reason"] == "set in adapt.domain"
    assert result.extra["ssl"]["steps"] >= 4 and result.extra["ssl"]["images"] > d["target_images"]  # source too
    model, _ = load_checkpoint(tmp_path / "runs" / "dom" / "checkpoints" / "teacher.safetensors")
    assert not any("projection" in k for k in model.state_dict())


def test_a_target_labeled_class_the_source_lacks_is_refused(tiny_data, target_dirs, tmp_path):
    import shutil

    from pipeline.adapt_stage import run_adapt
    from pipeline.errors import DataError

    bad = tmp_path / "bad"
    shutil.copytree(target_dirs[1], bad)
    (bad / "digit0").rename(bad / "cat")
    with pytest.raises(DataError, match="data.target_labeled: class folder.s. cat are not classes of the source data"):
        run_adapt(_adapt_cfg(tiny_data, tmp_path, target=target_dirs[0], target_labeled=bad))


# --------------------------------------------------------------------------- negative transfer


def test_negative_transfer_is_said_with_numbers():
    from pipeline.domain import negative_transfer, scratch_beats_pretrained

    info = {"method": "adabn", "candidates": {"none": {"target_accuracy": 0.75}, "adabn": {"target_accuracy": 0.5}}}
    assert negative_transfer(info) == [(
        "negative transfer: adapt.domain 'adabn' scores 50.0% on data.target_labeled, worse than source-only "
        "training (75.0%, -25.0 points). To try: adapt.domain none or auto, more target images, or a labeled target "
        "sample in the training data.")]
    info["candidates"]["adabn"]["target_accuracy"] = 0.8
    assert negative_transfer(info) == []
    note = scratch_beats_pretrained(0.6, 0.9)
    assert note.startswith("negative transfer: training from scratch reaches 90.0% validation accuracy, more than "
                           "the pretrained model's 60.0% (+30.0 points)")
    assert scratch_beats_pretrained(0.9, 0.6) is None and scratch_beats_pretrained(0.9, None) is None


def test_report_and_cli_lines_say_the_gap_the_method_and_negative_transfer():
    from pipeline.domain.explain import domain_lines, domain_section

    teacher = {"val_accuracy": 0.6, "baselines": {"scratch": {"val_accuracy": 0.9}}, "domain": {
        "requested": "adabn", "method": "adabn", "reason": "set in adapt.domain", "target_images": 40, "styled_closer": 0.8,
        "gap": {"accuracy": 0.95, "proxy_a_distance": 1.8, "level": "large"},
        "candidates": {"none": {"target_accuracy": 0.75, "val_accuracy": 1.0}, "adabn": {"target_accuracy": 0.5, "val_accuracy": 1.0}},
        "warnings": ["negative transfer: adapt.domain 'adabn' scores 50.0% ..."]}}
    lines = domain_lines(teacher)
    assert lines[0] == ("domain gap: a domain classifier tells source from target with 95.0% accuracy (large): the "
                        "backbone separates the two cameras at a glance; expect a drop on the device without adaptation")
    assert lines[1] == "domain method: adabn (adapt.domain adabn; set in adapt.domain)"
    assert lines[2:4] == ["  none: labeled target accuracy 0.7500, source val 1.0000",
                          "  adabn: labeled target accuracy 0.5000, source val 1.0000"]
    assert lines[4].startswith("negative transfer: adapt.domain 'adabn'")
    assert lines[5].startswith("negative transfer: training from scratch reaches 90.0%")
    md = "\n".join(domain_section(teacher))
    assert "a **large** gap" in md and "| adabn | 50.0% | 100.0% |" in md and "**negative transfer: training from" in md
    assert domain_section({"val_accuracy": 0.9}) == [] and domain_lines({"val_accuracy": 0.9}) == []


def test_advise_with_a_target_folder_measures_the_gap(tiny_data, target_dirs):
    from click.testing import CliRunner

    from pipeline.cli import cli

    r = CliRunner().invoke(cli, ["advise", str(tiny_data), "--input-size", "32", "--target", str(target_dirs[0])])
    assert r.exit_code == 0, r.output
    gap = next(line for line in r.output.splitlines() if line.startswith("domain gap (45 target images): a domain classifier"))
    assert "a large gap" in gap
    assert "  meaning: the backbone separates the two cameras at a glance" in r.output
    method = "style" if "  domain method: style (" in r.output else "none"
    assert f"    domain: {method}" in r.output


def test_run_with_a_target_folder_ships_a_plain_bundle_that_passes_parity(tiny_data, target_dirs, tmp_path):
    """data.root + data.target and the tiny run's settings: auto, then the same export and parity gate."""
    import onnx
    import yaml

    from pipeline.config import load_config
    from pipeline.export_stage import run_pipeline
    from tests.conftest import tiny_config_dict

    raw = tiny_config_dict(tiny_data, tmp_path / "runs", name="dom")
    raw["data"]["target"] = str(target_dirs[0])
    # FP32 only, a shorter distillation, no ONNX cost probe: INT8, the student's quality and its cost are not
    # about the domain step (the tiny run covers them), and the whole test suite has a 15-minute budget.
    raw["export"] = {"precisions": ["fp32"]}
    raw["distill"].update(steps=40, measure_cost=False)
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(tmp_path / "p.yaml")
    assert cfg.adapt.domain == "auto"
    out = run_pipeline(cfg)
    assert out.parity.passed
    n_target = len(list(Path(target_dirs[0]).glob("*.png")))
    # the deployment camera's images are in every artifact's agreement set (validate.unlabeled unset)
    assert all(r.agreement_sources.get("unlabeled") == n_target for r in out.parity.reports.values())
    d = out.adapt.extra["domain"]
    assert d["requested"] == "auto" and d["method"] in ("none", "style")
    g = onnx.load(str(cfg.run.bundle / "model.onnx")).graph
    assert [i.name for i in g.input] == ["input"] and not any("domain" in n.name for n in g.node)
    assert "## Domain shift: the deployment camera" in (cfg.run.root / "report.md").read_text()
