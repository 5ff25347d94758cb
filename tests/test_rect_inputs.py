"""Rectangular inputs (`model.input_size: [H, W]`): config, preprocessing parity between the training
side (torchvision) and the runtime (PIL + numpy), and a tiny model through `edgekiln run`, the parity
gate, the runtime and the server."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import cli
from pipeline.config import ModelConfig
from runtime.bundle import Preprocess
from runtime.preprocess import PreprocessSpec, preprocess

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _write(tmp_path, data) -> str:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return str(p)


# --------------------------------------------------------------------------- config


def test_config_takes_a_height_and_width():
    assert ModelConfig(input_size=[192, 320]).input_size == [192, 320]
    assert ModelConfig(input_size=[96, 96]).input_size == 96  # [N, N] is the square N
    assert ModelConfig(input_size=224).input_size == 224


@pytest.mark.parametrize("bad", [[192], [192, 320, 3], [8, 320], [192, 2048], [192.5, 320], "wide", True])
def test_bad_input_size_is_one_line_naming_the_field(tmp_path, tiny_data, bad):
    path = _write(tmp_path, {"data": {"root": str(tiny_data)}, "model": {"input_size": bad}})
    r = CliRunner().invoke(cli, ["run", path])
    assert r.exit_code == 2
    assert r.output.strip() == (f"error: {path}: model.input_size: must be an int or [height, width], "
                                f"each side 16..1024 (got {bad!r})")


def test_family_constraints_apply_to_each_side():
    from pipeline.errors import ModelError
    from pipeline.models import create_model, model_defaults

    with pytest.raises(ModelError) as e:
        create_model("torchvision/vit_b_32", 3, "none", input_size=(32, 40))
    assert str(e.value) == ("torchvision/vit_b_32 needs model.input_size a multiple of 32 on each side "
                            "(got [32, 40]; e.g. 32 or 64); its default is 224")
    with pytest.raises(ModelError, match=r"^torchvision/vit_b_32 takes square inputs only"):
        create_model("torchvision/vit_b_32", 3, "none", input_size=(32, 64))
    with pytest.raises(ModelError, match=r"needs model.input_size >= 75 on each side \(got \[75, 64\]\)"):
        model_defaults("torchvision/inception_v3").check_input_size("torchvision/inception_v3", (75, 64))


# --------------------------------------------------------------------------- preprocessing


def _images() -> list[Image.Image]:
    """Real-ish RGB images: smooth gradients plus noise, landscape and portrait, odd sizes."""
    rng = np.random.default_rng(0)
    out = []
    for w, h in ((500, 300), (200, 700), (333, 333)):
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], axis=-1)
        px = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
        out.append(Image.fromarray(px, mode="RGB"))
    return out


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
@pytest.mark.parametrize("size", [(192, 320), (320, 192), (24, 40), 96])
def test_runtime_preprocessing_matches_torchvision(size, interpolation):
    import torch

    from pipeline.data import eval_transform
    from pipeline.models import ModelDefaults

    spec = ModelDefaults(mean=MEAN, std=STD, interpolation=interpolation).preprocess(size, 0.875)
    if isinstance(size, tuple):  # exact resize to (H, W) / crop_pct, then the (H, W) center crop
        assert spec.resize == (round(size[0] / 0.875), round(size[1] / 0.875)) and spec.crop == size
    else:  # square: the shorter side resized, as before
        assert (spec.resize, spec.crop) == (110, 96)
    imgs = _images()
    got = preprocess(imgs, spec)
    want = torch.stack([eval_transform(spec)(img) for img in imgs]).numpy()
    h, w = spec.hw
    assert got.shape == want.shape == (len(imgs), 3, h, w)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_square_bundles_read_as_before_and_rectangular_ones_round_trip():
    old = {"resize": 256, "crop": 224, "mean": list(MEAN), "std": list(STD), "interpolation": "bilinear",
           "color": "RGB", "layout": "NCHW", "scale": "1/255"}
    assert Preprocess.model_validate(old).spec == PreprocessSpec(256, 224, MEAN, STD)
    assert Preprocess.of(PreprocessSpec(256, 224, MEAN, STD)).model_dump(mode="json") == old

    rect = PreprocessSpec((219, 366), (192, 320), MEAN, STD)
    dumped = Preprocess.of(rect).model_dump(mode="json")
    assert (dumped["resize"], dumped["crop"]) == ([219, 366], [192, 320])
    assert Preprocess.model_validate(json.loads(json.dumps(dumped))).spec == rect
    assert (rect.height, rect.width) == (192, 320)
    with pytest.raises(ValueError, match="resize and crop must both be ints"):
        Preprocess.model_validate({**old, "crop": [192, 320]})


# --------------------------------------------------------------------------- end to end


def _run(tmp_path, data, size: list[int], precisions=("fp32", "int8"), distill: bool = False):
    cfg = _write(tmp_path, {
        "name": "rect", "runs_dir": str(tmp_path / "runs"), "data": {"root": str(data), "batch_size": 16},
        "model": {"name": "compact_cnn_w0.5", "weights": "none", "input_size": size, "crop_pct": 0.875},
        "adapt": {"strategy": "finetune", "epochs": 1, "lr": 0.003},
        # distill: the student built, trained on the teacher's views and its ONNX cost measured at (H, W)
        "distill": ({"student": "compact_cnn_w0.5", "steps": 20, "lr": 0.01, "measure_cost": True, "augment": "light"}
                    if distill else {"enabled": False}),
        "export": {"precisions": list(precisions), "calibration_size": 12, "golden_images": 2},
        "deploy": {"latency_rounds": 5},
    })
    r = CliRunner().invoke(cli, ["run", cfg])
    assert r.exit_code == 0, r.output
    assert "Traceback" not in r.output
    return tmp_path / "runs" / "rect" / "bundle"


def test_rectangular_model_through_run_parity_runtime_and_server(tiny_data, tmp_path):
    from starlette.testclient import TestClient

    import runtime
    from runtime.bundle import read_bundle
    from runtime.serve import ServeSettings, create_app

    # The 192x320 (one run serves both: a second run at a small size costs CI half a minute)
    bundle = _run(tmp_path, tiny_data, [192, 320], distill=True)
    m = read_bundle(bundle).manifest
    assert m.input.shape == ["batch", 3, 192, 320]
    assert (m.preprocess.resize, m.preprocess.crop) == ((219, 366), (192, 320))
    assert m.artifacts["onnx"].parity["passed"]

    clf = runtime.load(bundle, artifact="onnx")
    assert clf.input_shape == (3, 192, 320)
    img = next((tiny_data / "digit0").glob("*.png"))
    assert clf.predict([str(img)])[0].label in ("digit0", "digit1", "digit2")
    assert clf.preprocess([str(img)]).shape == (1, 3, 192, 320)
    assert clf.self_test().passed  # the golden images, preprocessed at 192x320, give export's logits

    app = create_app(ServeSettings(bundle_dir=str(bundle), backend="cpu", artifact="onnx"))
    with TestClient(app) as c:  # the lifespan loads the bundle and self-tests it on its golden images
        meta = c.get("/v2/models/edgekiln").json()
        assert meta["inputs"][0]["shape"] == [-1, 3, 192, 320]
        buf = io.BytesIO()
        Image.open(img).save(buf, format="PNG")
        r = c.post("/v1/classify", content=buf.getvalue(), headers={"content-type": "image/png"})
        assert r.status_code == 200, r.text
        assert r.json()["predictions"][0]["label"] == clf.predict([str(img)])[0].label
        x = np.zeros((1, 3, 192, 320), np.float32)
        r = c.post("/v2/models/edgekiln/infer", json={"inputs": [
            {"name": m.input.name, "shape": [1, 3, 192, 320], "datatype": "FP32", "data": x.ravel().tolist()}]})
        assert r.status_code == 200, r.text
        r = c.post("/v2/models/edgekiln/infer", json={"inputs": [
            {"name": m.input.name, "shape": [1, 3, 320, 192], "datatype": "FP32", "data": x.ravel().tolist()}]})
        assert r.status_code == 400


@pytest.mark.parametrize("preset", ["light", "strong"])
def test_augmentation_keeps_the_rectangular_shape(tiny_data, preset):
    from pipeline.strategies.data import load_uint8, train_transform

    spec = PreprocessSpec((27, 46), (24, 40), MEAN, STD)
    x = load_uint8(sorted((tiny_data / "digit0").glob("*.png"))[:3], spec)
    assert x.shape == (3, 3, 24, 40)
    assert train_transform(preset, spec)(x[0]).shape == (3, 24, 40)
