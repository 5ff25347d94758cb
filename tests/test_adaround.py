"""Adaptive rounding of INT8 weights (exporters.adaround) on tiny hand-built graphs (seconds): the chosen
integers are the ones onnxruntime's quantizer then writes, every weight moves at most one level from
nearest, and the quantized model's outputs are closer to the float model's than with nearest rounding."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from exporters.adaround import adaptive_rounding, apply_rounding
from exporters.bias_correction import quantized_weights
from exporters.quantize import preprocess_for_quantization, quantize_int8, quantize_qdq, run_onnx
from tests.onnx_graphs import save_graph


@pytest.fixture()
def two_convs(tmp_path):
    """A depthwise 3x3 convolution whose small weights all sit 0.55 of a 7-bit level past the grid (nearest
    rounds them all up), a ReLU6, then a 1x1 convolution with random weights: nearest rounding shifts
    every output one way, and the errors of the two layers add up."""
    rng = np.random.default_rng(0)
    dw = rng.uniform(0.05, 0.2, size=(8, 1, 3, 3))
    dw = (np.floor(dw * 64) + 0.55) / 64  # 0.55 of a level past the grid, scale 1/64 (maximum 1 below)
    dw[:, 0, 1, 1] = 1.0
    pw = rng.normal(size=(8, 8, 1, 1)) * 0.3
    path = save_graph([helper.make_node("Conv", ["input", "dw", "b1"], ["c1"], name="dw", group=8, pads=[1, 1, 1, 1]),
                  helper.make_node("Clip", ["c1", "lo", "hi"], ["a1"], name="relu6"),
                  helper.make_node("Conv", ["a1", "pw", "b2"], ["c2"], name="pw"),
                  helper.make_node("GlobalAveragePool", ["c2"], ["p"], name="pool"),
                  helper.make_node("Flatten", ["p"], ["logits"], name="flat")],
                 {"dw": dw, "b1": np.zeros(8), "pw": pw, "b2": np.zeros(8), "lo": 0.0, "hi": 6.0},
                 tmp_path / "m.onnx", ["N", 8, 8, 8], ["N", 8])
    pre = tmp_path / "pre.onnx"
    preprocess_for_quantization(path, pre)
    x = rng.uniform(0, 1, size=(64, 8, 8, 8)).astype(np.float32)
    return path, pre, x


def test_rounded_weights_are_the_integers_the_quantizer_writes(two_convs, tmp_path):
    _, pre, x = two_convs
    nearest = tmp_path / "nearest.onnx"
    quantize_qdq(pre, nearest, x, "input", calibration_cache=tmp_path / "cal.json")
    weights, report = adaptive_rounding(pre, nearest, x, tmp_path, iterations=200)
    assert report.nodes == 2 and report.skipped == 0 and set(weights) == {"dw", "pw"}
    assert 0 < report.changed_weights < report.weights and report.error_ratio < 1.0
    rounded = apply_rounding(pre, tmp_path / "rounded.onnx", weights)
    requantized = tmp_path / "requantized.onnx"
    quantize_qdq(rounded, requantized, x, "input", calibration_cache=tmp_path / "cal.json")
    before, after = quantized_weights(nearest), quantized_weights(requantized)
    floats = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(pre)).graph.initializer}
    for name in ("dw", "pw"):
        scale = np.abs(floats[name]).reshape(len(floats[name]), -1).max(1).reshape(-1, 1, 1, 1) / 64
        # exactly what the quantizer stores from them: the rounding survives quantization
        np.testing.assert_allclose(after[name], weights[name], rtol=0, atol=1e-7)
        # each weight rounded down or up, never further; each channel's maximum (and so its scale) kept
        assert np.all(np.abs(weights[name] - floats[name]) < scale + 1e-7)
        np.testing.assert_allclose(np.abs(weights[name]).reshape(len(scale), -1).max(1), scale.ravel() * 64,
                                   rtol=1e-6)
    moved = np.abs(after["dw"] - before["dw"]) > 1e-7
    assert moved.any(), "adaptive rounding chose nearest everywhere"
    ref = run_onnx(pre, x)
    err_nearest = np.abs(run_onnx(nearest, x) - ref).mean()
    err_rounded = np.abs(run_onnx(requantized, x) - ref).mean()
    assert err_rounded < 0.7 * err_nearest, (err_nearest, err_rounded)


def test_nodes_kept_in_float_keep_their_weights(two_convs, tmp_path):
    _, pre, x = two_convs
    nearest = tmp_path / "nearest.onnx"
    quantize_qdq(pre, nearest, x, "input")
    weights, _ = adaptive_rounding(pre, nearest, x, tmp_path, iterations=20)
    out = apply_rounding(pre, tmp_path / "r.onnx", weights, skip=["dw"])
    got = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    orig = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(pre)).graph.initializer}
    np.testing.assert_array_equal(got["dw"], orig["dw"])
    np.testing.assert_array_equal(got["pw"], weights["pw"])


def test_the_guard_keeps_the_rounding_only_when_the_logits_get_closer(two_convs, tmp_path):
    fp32, _, x = two_convs
    ref = run_onnx(fp32, x)
    y = ref.argmax(1)
    plain = quantize_int8(fp32, tmp_path / "plain.onnx", x[:32], x, y, bias_correction=False, rounding="nearest")
    res = quantize_int8(fp32, tmp_path / "adaptive.onnx", x[:32], x, y, bias_correction=False, rounding="adaptive")
    assert plain.rounding == {}
    assert res.rounding["nodes"] == 2 and res.rounding["used"]
    assert res.rounding["with"]["logit_error"] < res.rounding["before"]["logit_error"]
    err_plain = np.abs(run_onnx(tmp_path / "plain.onnx", x) - ref).mean()
    err_adaptive = np.abs(run_onnx(tmp_path / "adaptive.onnx", x) - ref).mean()
    assert err_adaptive == pytest.approx(res.rounding["with"]["logit_error"], rel=1e-5)
    assert err_adaptive < 0.7 * err_plain, (err_plain, err_adaptive)


def test_weights_the_quantizer_does_not_round_per_channel_are_left_alone(tmp_path):
    """A Gemm (the classifier) keeps nearest rounding: only Conv weights are rounded adaptively."""
    rng = np.random.default_rng(1)
    path = save_graph([helper.make_node("Gemm", ["input", "w", "b"], ["logits"], name="fc", transB=1)],
                 {"w": rng.normal(size=(4, 16)), "b": np.zeros(4)}, tmp_path / "fc.onnx", ["N", 16], ["N", 4])
    x = rng.uniform(0, 1, size=(32, 16)).astype(np.float32)
    pre = tmp_path / "pre.onnx"
    preprocess_for_quantization(path, pre)
    quantize_qdq(pre, tmp_path / "q.onnx", x, "input")
    weights, report = adaptive_rounding(pre, tmp_path / "q.onnx", x, tmp_path, iterations=10)
    assert weights == {} and report.nodes == 0


def test_auto_skips_the_rounding_when_every_guard_image_already_gets_the_fp32_answer(tmp_path):
    """Weights on the 7-bit grid and one channel far above the others in every image: the INT8 model gives
    every image the FP32 label, so `auto` does not spend minutes rounding; `adaptive` still runs it."""
    rng = np.random.default_rng(2)
    w = rng.integers(-64, 65, size=(4, 4, 1, 1)) / 64.0
    w[:, :, 0, 0] = np.eye(4) * 2 - 1 + w[:, :, 0, 0] * 0.1  # class c reads channel c
    w = np.round(w * 64 / np.abs(w).reshape(4, -1).max(1).reshape(4, 1, 1, 1)) / 64  # on each channel's grid
    path = save_graph([helper.make_node("Conv", ["input", "w", "b"], ["c"], name="conv"),
                  helper.make_node("GlobalAveragePool", ["c"], ["p"], name="pool"),
                  helper.make_node("Flatten", ["p"], ["logits"], name="flat")],
                 {"w": w, "b": np.zeros(4)}, tmp_path / "easy.onnx", ["N", 4, 4, 4], ["N", 4])
    x = rng.uniform(0, 0.2, size=(32, 4, 4, 4)).astype(np.float32)
    x[np.arange(32), np.arange(32) % 4] += 1.0
    y = run_onnx(path, x).argmax(1)
    assert set(y) == {0, 1, 2, 3}
    auto = quantize_int8(path, tmp_path / "auto.onnx", x, x, y, rounding="auto")
    assert auto.rounding == {"skipped": "every validation image already gets the FP32 model's answer"}
    forced = quantize_int8(path, tmp_path / "forced.onnx", x, x, y, rounding="adaptive")
    assert forced.rounding["nodes"] == 1


def test_more_calibration_images_than_it_uses_are_taken_evenly_spread():
    """The calibration set comes class by class: the first 256 of 600 images would be a few classes."""
    from exporters.adaround import _spread
    from exporters.calibration import ImageSource

    src = ImageSource(array=np.arange(10, dtype=np.float32).reshape(10, 1))
    assert _spread(src, 4).array.ravel().tolist() == [0, 3, 6, 9]
    assert _spread(src, 10) is src
