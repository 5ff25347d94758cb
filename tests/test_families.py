"""Every architecture family a user can name works end to end, or is refused in one line.

FAMILY_CASES names one architecture per registered family with a small input size it accepts;
test_every_family_is_covered fails when a family is registered without a case here (and when a
torchvision classifier belongs to no family). The fast tests run every family through what decides
whether it works (build at that size, a training step, LoRA's default targets and their merge,
distillation as teacher and as student, the checkpoint round trip); one small family goes through the
whole pipeline (adapt -> export fp32/int8 -> parity -> runtime) in CI, every family does under `-m slow`.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from click.testing import CliRunner

from pipeline.errors import ModelError
from pipeline.models import check_runs, create_model
from pipeline.models_torchvision import TORCHVISION_FAMILIES, torchvision_classifiers, torchvision_family

# family -> (an architecture of it, a small input size it accepts)
FAMILY_CASES = {
    "alexnet": ("torchvision/alexnet", 64),
    "resnet": ("torchvision/resnet18", 32),
    "resnext": ("torchvision/resnext50_32x4d", 32),
    "wide_resnet": ("torchvision/wide_resnet50_2", 32),
    "vgg": ("torchvision/vgg11", 32),
    "inception": ("torchvision/inception_v3", 75),
    "googlenet": ("torchvision/googlenet", 32),
    "densenet": ("torchvision/densenet121", 32),
    "squeezenet": ("torchvision/squeezenet1_1", 32),
    "mobilenet_v2": ("torchvision/mobilenet_v2", 32),
    "mobilenet_v3": ("torchvision/mobilenet_v3_small", 32),
    "mnasnet": ("torchvision/mnasnet0_5", 32),
    "shufflenet_v2": ("torchvision/shufflenet_v2_x0_5", 32),
    "efficientnet": ("torchvision/efficientnet_b0", 32),
    "efficientnet_v2": ("torchvision/efficientnet_v2_s", 48),
    "regnet": ("torchvision/regnet_y_400mf", 32),
    "convnext": ("torchvision/convnext_tiny", 32),
    "vit": ("torchvision/vit_b_32", 32),
    "swin": ("torchvision/swin_t", 32),
    "swin_v2": ("torchvision/swin_v2_t", 32),
    "maxvit": ("torchvision/maxvit_t", 224),
}
# timm models by name take the same road (not a torchvision family: checked here as well).
TIMM_CASES = {"timm-cnn": ("timm/resnet10t", 32), "timm-vit": ("timm/vit_tiny_patch16_224", 32)}
# Families whose case builds a big network (tens of millions of weights) or a big input run with EDGEKILN_HEAVY_TESTS=1 (marker `heavy`),
# and so do CNN families whose constraints a fast case already covers (CI keeps the suite under 15 minutes on
# 2 cores). The fast run keeps one of each kind of constraint: auxiliary heads and a 75 px minimum
# (Inception), a conv classifier (SqueezeNet), attention adapted whole (timm's ViT), the CNN families'
# pointwise targets (ResNet, MobileNetV3: squeeze-excite) and a checkpoint with state-dict versions (MNASNet).
HEAVY = {"alexnet", "resnext", "wide_resnet", "vgg", "vit", "maxvit", "convnext", "efficientnet_v2", "swin", "swin_v2",
         "densenet", "googlenet", "regnet", "shufflenet_v2", "efficientnet", "mobilenet_v2", "timm-cnn"}


def _cases() -> list:
    return [pytest.param(c, marks=pytest.mark.heavy) if c in HEAVY else c
            for c in sorted(FAMILY_CASES) + sorted(TIMM_CASES)]


def test_every_family_is_covered():
    assert set(TORCHVISION_FAMILIES) == set(FAMILY_CASES)
    for arch in torchvision_classifiers():  # every torchvision classifier belongs to a family
        assert torchvision_family(arch).name in FAMILY_CASES


@pytest.mark.parametrize("case", _cases())
def test_family_trains_adapts_distills_and_reloads(case, tmp_path):
    """At a small input size: a training step; LoRA's default targets train something and merge
    exactly; distillation with it as teacher and as student; the checkpoint rebuilds the same model."""
    from peft import LoraConfig, get_peft_model

    from pipeline.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
    from pipeline.distill import build_student, teacher_outputs
    from pipeline.strategies.lora import LORA_PARITY_TOL, default_lora_targets
    from pipeline.training import kd_loss

    name, size = {**FAMILY_CASES, **TIMM_CASES}[case]
    torch.manual_seed(0)
    model = create_model(name, 3, "none", input_size=size)
    check_runs(model, size)
    x, y = torch.randn(2, 3, size, size), torch.tensor([0, 2])
    model.train()
    torch.nn.functional.cross_entropy(model(x), y).backward()  # aux heads are off: one logits tensor
    assert all(p.grad is not None for p in model.head.parameters())
    model.eval()
    with torch.no_grad():
        ref = model(x)
    assert ref.shape == (2, 3) and torch.isfinite(ref).all()

    # checkpoint round trip: arch + preprocessing rebuild the same network at the same size
    spec = model.defaults.preprocess(size)
    path = tmp_path / "m.safetensors"
    save_checkpoint(model, CheckpointMeta(name, ["a", "b", "c"], spec, "teacher", {}), path)
    again, meta = load_checkpoint(path)
    with torch.no_grad():
        assert torch.allclose(again(x), ref, atol=1e-5)

    # distillation: as teacher (its logits) and as student (built at the teacher's size, a KD step)
    t_logits, _ = teacher_outputs(model, x)
    student = build_student(name, 3, "none", input_size=size).train()
    kd_loss(student(x), t_logits, y, 4.0, 0.7).backward()

    # LoRA: the family's default targets change the output while unmerged, and merge within tolerance
    targets = default_lora_targets(again)
    peft_model = get_peft_model(again, LoraConfig(r=4, lora_alpha=8, target_modules=targets, bias="none"))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
        peft_model.eval()
        adapted = peft_model(x)
        with peft_model.disable_adapter():
            without = peft_model(x)
        merged = peft_model.merge_and_unload()
        diff = float((merged(x) - adapted).abs().max())
    # Any change at all: ConvNeXt's layer scale starts at 1e-6, so a random-init block barely moves the output.
    assert float((adapted - without).abs().max()) > 0, "the adapters do not reach the output"
    # Relative to the logits' scale: a random-init Inception in eval mode reaches logits of ~1e7.
    assert diff <= LORA_PARITY_TOL * max(1.0, float(adapted.abs().max()))


@pytest.mark.parametrize("name,size,fits", [
    ("torchvision/inception_v3", 64, "model.input_size >= 75"),
    ("torchvision/maxvit_t", 64, "model.input_size >= 224"),
    ("torchvision/maxvit_t", 300, "a multiple of 224"),
    ("torchvision/vit_b_16", 40, "a multiple of 16 (got 40; e.g. 32 or 48)"),
])
def test_unfit_input_size_is_refused_in_one_line(name, size, fits):
    with pytest.raises(ModelError) as e:
        create_model(name, 3, "none", input_size=size)
    assert fits in str(e.value) and "\n" not in str(e.value) and "its default is" in str(e.value)


def test_family_defaults_come_with_the_weights():
    from pipeline.models import model_defaults

    inc = model_defaults("torchvision/inception_v3")
    assert (inc.input_size, inc.preprocess().resize, inc.mean) == (299, 342, (0.5, 0.5, 0.5))
    eff = model_defaults("torchvision/efficientnet_b0")
    assert (eff.input_size, eff.interpolation, eff.preprocess().resize) == (224, "bicubic", 256)
    vit = model_defaults("torchvision/vit_b_16")
    assert vit.sized_at_build and vit.input_multiple == 16 and vit.lora_targets == "linear"
    assert model_defaults("torchvision/swin_t").lora_targets == "mlp"
    assert model_defaults("timm/resnet10t").family == "timm"


def test_vit_lora_trains_under_two_percent():
    from pipeline.models import count_params
    from pipeline.strategies.lora import default_lora_targets
    from peft import LoraConfig, get_peft_model

    model = create_model("torchvision/vit_b_16", 3, "none", input_size=32)
    backbone = count_params(model.backbone)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=default_lora_targets(model)))
    lora = count_params(p for n, p in peft_model.named_parameters() if "lora_" in n)
    assert 0.005 < lora / backbone < 0.02


def test_cli_refuses_an_unfit_size_before_any_work(tiny_data, tmp_path):
    from pipeline.cli import cli

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"name": "inc", "runs_dir": str(tmp_path / "runs"), "data": {"root": str(tiny_data)},
                                   "model": {"name": "torchvision/inception_v3", "weights": "none", "input_size": 64},
                                   "adapt": {"strategy": "finetune", "epochs": 1}}))
    r = CliRunner().invoke(cli, ["adapt", str(cfg)])
    assert r.exit_code == 1
    assert r.output.strip().splitlines()[-1] == (
        "error: torchvision/inception_v3 needs model.input_size >= 75 (got 64); its default is 299")
    assert "Traceback" not in r.output and not (tmp_path / "runs" / "inc" / "split.json").exists()


def _end_to_end(name: str, size: int, data, tmp_path, strategy: str = "finetune") -> dict:
    """adapt (1 epoch) -> export fp32 + int8 (parity gate) -> runtime prediction, through the CLI."""
    from pipeline.cli import cli
    import runtime

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({
        "name": "fam", "runs_dir": str(tmp_path / "runs"), "data": {"root": str(data), "batch_size": 16},
        "model": {"name": name, "weights": "none", "input_size": size, "crop_pct": 1.0},
        "adapt": {"strategy": strategy, "epochs": 1, "lr": 0.003},
        "distill": {"enabled": False},
        "export": {"precisions": ["fp32", "int8"], "calibration_size": 12, "golden_images": 2},
        "deploy": {"latency_rounds": 5},
    }))
    r = CliRunner().invoke(cli, ["run", str(cfg)])
    assert r.exit_code == 0, r.output
    assert "Traceback" not in r.output
    bundle = tmp_path / "runs" / "fam" / "bundle"
    clf = runtime.load(bundle, artifact="onnx")
    img = next((data / "digit0").glob("*.png"))
    assert clf.predict([str(img)])[0].label in ("digit0", "digit1", "digit2")
    m = runtime.bundle.read_bundle(bundle).manifest
    assert m.artifacts["onnx"].parity["passed"]
    cost = m.metrics["export"]
    assert cost["peak_rss_mb"] > 0 and cost["seconds"] > 0 and "onnx" in cost["steps"]
    metrics = json.loads((tmp_path / "runs" / "fam" / "metrics.json").read_text())
    built = {(c["model"], c["artifact"]) for c in metrics["deploy"]["candidates"]}
    assert ("teacher", "onnx_int8") in built  # built and measured; shipped only when it passed its gate
    return metrics


def test_small_family_end_to_end(tiny_data, tmp_path):
    """SqueezeNet (its 1x1-conv classifier turned into a linear head) through the whole pipeline."""
    _end_to_end("torchvision/squeezenet1_1", 32, tiny_data, tmp_path)


@pytest.mark.heavy
@pytest.mark.parametrize("case", sorted(FAMILY_CASES) + sorted(TIMM_CASES))
def test_every_family_end_to_end(case, tiny_data, tmp_path):
    name, size = {**FAMILY_CASES, **TIMM_CASES}[case]
    _end_to_end(name, size, tiny_data, tmp_path)


@pytest.mark.heavy
@pytest.mark.parametrize("strategy", ["feature_extraction", "lora"])
def test_transformer_strategies_end_to_end(strategy, tiny_data, tmp_path):
    _end_to_end("torchvision/vit_b_32", 32, tiny_data, tmp_path, strategy=strategy)


def test_lora_targets_per_family_are_named_layers():
    from pipeline.strategies.lora import default_lora_targets

    vit = default_lora_targets(create_model("torchvision/vit_b_32", 3, "none", input_size=32))
    assert any(t.endswith("self_attention") for t in vit) and any(t.endswith("mlp.0") for t in vit)
    assert not any(t.endswith("out_proj") for t in vit)  # adapted with its attention module
    swin = default_lora_targets(create_model("torchvision/swin_t", 3, "none", input_size=32))
    assert swin and all(".mlp." in t for t in swin)
    cnn = default_lora_targets(create_model("torchvision/mobilenet_v2", 3, "none", input_size=32))
    assert cnn and all(t.startswith("backbone.features.") for t in cnn)
