"""Adapt strategies on tiny data: every registered strategy end to end, plus the
pieces each one relies on (block groups, layer-wise LR, the feature cache, LoRA merge)."""

import json

import pytest
import torch
from click.testing import CliRunner

from pipeline.checkpoint import load_checkpoint
from pipeline.config import STRATEGIES, build_config
from pipeline.data import Split, load_tensors
from pipeline.models import create_model
from pipeline.strategies import (
    block_groups,
    default_lora_targets,
    finetune_param_groups,
    list_strategies,
    register_strategy,
    trainable_groups_at,
    train_transform,
)
from tests.conftest import tiny_config_dict

# What each strategy's end-to-end test adds to the tiny config (and checks below).
STRATEGY_CASES = {
    "feature_extraction": {"epochs": 20},
    "finetune": {"epochs": 3, "lr": 3e-3, "baselines": True, "finetune": {"unfreeze": 2, "layer_decay": 0.7}},
    "lora": {"epochs": 3, "lr": 1e-2, "lora": {"rank": 4, "alpha": 8}},
}


def adapt_config(tiny_data, tmp_path, name="a", **adapt):
    d = tiny_config_dict(tiny_data, tmp_path / "runs", name=name)
    d["adapt"] = {**d["adapt"], **adapt}
    return build_config(d)


def test_registry_matches_the_config_and_every_strategy_has_a_test():
    assert list_strategies() == list(STRATEGIES)
    assert set(STRATEGY_CASES) == set(list_strategies())
    with pytest.raises(ValueError, match="already registered"):
        register_strategy("lora")(lambda *a: None)


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("strategy", list(STRATEGY_CASES))
def test_strategy_end_to_end(strategy, tiny_data, tmp_path):
    import yaml

    from pipeline.cli import cli

    d = tiny_config_dict(tiny_data, tmp_path / "runs", name=strategy)
    d["adapt"] = {**d["adapt"], "strategy": strategy, **STRATEGY_CASES[strategy]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(d))
    cfg = build_config(d)
    pretrained = create_model(cfg.model.name, 3, cfg.model.weights)
    r = CliRunner().invoke(cli, ["adapt", str(tmp_path / "c.yaml")])
    assert r.exit_code == 0, r.output
    run = cfg.run_dir
    m = json.loads((run / "metrics.json").read_text())["teacher"]
    # log lines (e.g. "adapt: ...") may be interleaved depending on logging setup; check the command's own lines
    out = [line for line in r.output.splitlines() if not line.startswith(("adapt: ", "resuming ", "edgekiln runtime"))]
    assert out[0] == (
        f"teacher efficientnet_lite0 ({strategy}): test accuracy {m['test_accuracy']:.4f}, "
        f"macro-F1 {m['macro_f1']:.4f}, AUC-ROC {m['auc_roc_ovr']:.4f}"
    )
    assert out[1] == f"trainable parameters: {m['trainable_params']:,} of {m['params']:,} ({m['trainable_fraction']:.2%})"

    # evaluation: numbers, plots and report
    assert m["strategy"] == strategy and m["test_accuracy"] >= 0.6
    for key in ("macro_f1", "auc_roc_ovr", "per_class", "confusion_matrix", "history", "trainable_fraction"):
        assert key in m, key
    assert set(m["per_class"]) == {"digit0", "digit1", "digit2"}
    assert sum(map(sum, m["confusion_matrix"])) == 9
    assert (run / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    assert (run / "training_curves.png").is_file()
    report = (run / "report.md").read_text()
    assert f"({strategy})" in report and "### Per class" in report and "![Confusion matrix](confusion_matrix.png)" in report
    assert not (run / "checkpoints" / "adapt-resume").exists()

    # the checkpoint is a plain model that reproduces the reported test accuracy
    model, meta = load_checkpoint(run / "checkpoints" / "teacher.safetensors")
    assert meta.extra["strategy"] == strategy
    split = Split.load(run / "split.json")
    x, y = load_tensors(split.paths("test"), split.labels("test"), meta.preprocess)
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    assert acc == pytest.approx(m["test_accuracy"])

    before, after = pretrained.state_dict(), model.state_dict()
    groups = [name for name, _ in block_groups(pretrained)]
    if strategy == "feature_extraction":
        # frozen backbone: weights and BatchNorm running statistics unchanged
        assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("backbone."))
    elif strategy == "finetune":
        # unfreeze: 2 -> only blocks.6 and conv_head (+ their BN statistics) change
        assert groups[-2:] == ["blocks.6", "conv_head"]
        changed = {k.split(".")[1] for k in before if k.startswith("backbone.") and not torch.equal(before[k], after[k])}
        assert changed == {"blocks", "conv_head", "bn2"}
        assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("backbone.blocks.5", "backbone.bn1")))
        assert not all(torch.equal(before[k], after[k]) for k in before if k.startswith("backbone.blocks.6"))
        assert m["unfrozen_groups_at_end"] == 2
        b = m["baselines"]
        assert set(b) == {"scratch", "linear_probe"} and b["linear_probe"]["test_accuracy"] >= 0.6
        assert "Compared with baselines" in report and "scratch (random init, same budget)" in report
        assert out[2].startswith("baseline scratch: test accuracy ") and out[3].startswith("baseline linear_probe: ")
    else:
        lo = m["lora"]
        assert lo["trainable_fraction_of_backbone"] < 0.10
        assert lo["merge_max_abs_logit_diff"] <= 1e-4
        assert out[2].startswith(f"lora: adapters {lo['adapter_params']:,} = {lo['trainable_fraction_of_backbone']:.2%} of the backbone; ")
        assert set(after) == set(before)  # merged: no adapter weights left in the checkpoint
        adapter = run / "lora_adapter"
        assert {"adapter_config.json", "adapter_model.safetensors", "head.safetensors"} <= {p.name for p in adapter.iterdir()}
        assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
        # BatchNorm statistics of the frozen backbone are untouched
        assert all(torch.equal(before[k], after[k]) for k in before if "running_" in k)


def test_block_groups_run_from_stem_to_head_and_cover_the_backbone():
    for name, first, last in (
        ("efficientnet_lite0", "stem", "conv_head"),
        ("torchvision/resnet18", "conv1", "layer4"),
        ("torchvision/mobilenet_v3_small", "features.0", "classifier"),
        ("compact_cnn_w0.5", "features.0", "features.9"),
    ):
        model = create_model(name, 3, "none")
        groups = block_groups(model)
        assert groups[0][0] == first and groups[-1][0] == last, [g for g, _ in groups]
        covered = {id(p) for _, mods in groups for m in mods for p in m.parameters()}
        assert covered == {id(p) for p in model.backbone.parameters()}, name
    lite0 = [g for g, _ in block_groups(create_model("efficientnet_lite0", 3, "none"))]
    assert lite0 == ["stem"] + [f"blocks.{i}" for i in range(7)] + ["conv_head"]


def test_layer_wise_lr_decays_from_head_to_stem():
    from pipeline.training import make_optimizer

    model = create_model("compact_cnn_w0.5", 3, "none")
    opt = make_optimizer("sgd", finetune_param_groups(model, 0.5, 1e-4), lr=0.1, weight_decay=1e-4)
    head = {id(p) for p in model.head.parameters()}
    lrs = {}
    for g in opt.param_groups:
        for p in g["params"]:
            lrs[id(p)] = g["lr"]
        assert g["weight_decay"] == (1e-4 if g["params"][0].ndim > 1 else 0.0)  # no decay on biases/norms
    assert {lrs[i] for i in head} == {0.1}
    per_group = [{lrs[id(p)] for m in mods for p in m.parameters()} for _, mods in block_groups(model)]
    assert per_group == [{0.1 * 0.5**4}, {0.1 * 0.5**3}, {0.1 * 0.5**2}, {0.1 * 0.5}]


def test_progressive_unfreezing_adds_one_group_every_k_epochs():
    assert [trainable_groups_at(e, 0, 3, 2) for e in range(1, 9)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [trainable_groups_at(e, 2, 9, None) for e in (1, 5)] == [2, 2]


def test_lora_default_targets_are_pointwise_convs_and_linears():
    lite0 = create_model("efficientnet_lite0", 3, "none")
    t = default_lora_targets(lite0)
    assert "backbone.conv_head" in t and "backbone.blocks.1.0.conv_pw" in t and "backbone.blocks.1.0.conv_pwl" in t
    assert not any("conv_dw" in n or n == "backbone.conv_stem" for n in t)
    # CompactCNN has only 3x3 convolutions: every (non-grouped) conv is adapted
    assert default_lora_targets(create_model("compact_cnn_w0.5", 3, "none")) == [f"backbone.features.{i}" for i in (0, 3, 6, 9)]


def test_augmentation_presets_are_train_only():
    from pipeline.data import eval_transform
    from runtime.preprocess import PreprocessSpec

    spec = PreprocessSpec(resize=32, crop=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    ref = eval_transform(spec).transforms[-1](eval_transform(spec).transforms[-2](img))
    assert torch.equal(train_transform("none", spec)(img), ref)  # 'none' is exactly the eval normalisation
    torch.manual_seed(0)
    light = train_transform("light", spec)
    assert any(not torch.equal(light(img), ref) for _ in range(5))
    assert train_transform("strong", spec)(img).shape == (3, 32, 32)


def test_feature_cache_hits_and_is_invalidated_by_files_weights_and_transform(tiny_data, monkeypatch, tmp_path):
    import os

    from pipeline import features
    from runtime.preprocess import PreprocessSpec

    monkeypatch.setenv("EDGEKILN_CACHE", str(tmp_path / "cache"))
    model = create_model("compact_cnn_w0.5", 3, "none").eval()
    calls = []
    model.backbone.register_forward_hook(lambda *a: calls.append(1))
    paths = sorted(tiny_data.rglob("*.png"))[:6]
    labels = [0] * 6
    spec = PreprocessSpec(resize=32, crop=32, mean=(0.5,) * 3, std=(0.5,) * 3)

    def feats(spec=spec):
        calls.clear()
        f = features.cached_features(model.backbone, "compact_cnn_w0.5", paths, labels, spec)
        return f, bool(calls)

    f1, computed = feats()
    assert computed and len(list((tmp_path / "cache" / "features").glob("*.safetensors"))) == 1
    f2, computed = feats()
    assert not computed and torch.equal(f1, f2)  # cache hit: the backbone did not run
    st = paths[0].stat()
    os.utime(paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert feats()[1]  # a changed file -> new key
    assert feats(PreprocessSpec(resize=36, crop=32, mean=(0.5,) * 3, std=(0.5,) * 3))[1]  # another transform
    with torch.no_grad():
        model.backbone.features[0].weight.mul_(2)
    assert feats()[1]  # other weights


def test_logistic_regression_head_matches_sklearn():
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    from pipeline.features import fit_logistic_regression

    g = torch.Generator().manual_seed(0)
    for k in (2, 4):
        x = torch.randn(80, 5, generator=g) * 3 + 1
        y = torch.randint(0, k, (80,), generator=g)
        w, b = fit_logistic_regression(x, y, k)
        xs = (x.double().numpy() - x.double().numpy().mean(0)) / (x.double().numpy().std(0) + 1e-6)
        ref = LogisticRegression(max_iter=2000, random_state=0).fit(xs, y.numpy()).predict_proba(xs)
        ours = torch.softmax(x @ w.T + b, 1).numpy()
        assert np.abs(ours - ref).max() < 1e-4


def test_logistic_regression_head_strategy(tiny_data, tmp_path):
    from pipeline.adapt_stage import run_adapt

    cfg = adapt_config(tiny_data, tmp_path, feature_extraction={"head": "logistic_regression"})
    r = run_adapt(cfg)
    assert r.extra["head"] == "logistic_regression" and r.test_accuracy >= 0.6 and r.history == []
    assert not (cfg.run_dir / "training_curves.png").exists()
    assert "Training curves" not in (cfg.run_dir / "report.md").read_text()


def test_augmented_feature_extraction_trains_on_images_with_a_frozen_backbone(tiny_data, tmp_path):
    from pipeline.adapt_stage import run_adapt

    cfg = adapt_config(tiny_data, tmp_path, epochs=2, augment="strong")
    before = create_model(cfg.model.name, 3, cfg.model.weights).state_dict()
    r = run_adapt(cfg)
    assert "feature_cache" not in r.extra and len(r.history) == 2  # no cache: augmented images differ every epoch
    after, _ = load_checkpoint(cfg.run_dir / "checkpoints" / "teacher.safetensors")
    after = after.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("backbone."))
    assert not torch.equal(before["head.weight"], after["head.weight"])
