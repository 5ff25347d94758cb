"""INT8 quantization on tiny hand-built graphs (seconds): 7-bit weights that cannot saturate the x86
U8xS8 kernels, and the guard that keeps nodes in float until the runtime's decisions (label or
unknown) agree with the FP32 model's as often as the parity gate's floor asks."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from exporters.decisions import SCORE_TIE, same_decisions
from exporters.quantize import (
    preprocess_for_quantization,
    quantize_int8,
    quantize_qdq,
    run_onnx,
)
from runtime.backends.ort import open_onnx, u8s8_saturates
from runtime.bundle import OODSpec, Trust
from runtime.trust import ood_score
from tests.onnx_graphs import save_graph


@pytest.fixture()
def saturating_conv(tmp_path):
    """A 1x1 convolution over 64 channels whose weights are all near their channel's maximum: with 8-bit
    weights, pairs of U8 activations x S8 weights reach 2 * 255 * 127 > 32767, the int16 sum the x86
    kernels without VNNI saturate."""
    rng = np.random.default_rng(0)
    w = (rng.choice([-1.0, 1.0], size=(8, 64, 1, 1)) * rng.uniform(0.9, 1.0, size=(8, 64, 1, 1)))
    # same sign in pairs of input channels: their products add up instead of cancelling
    w[:, 1::2] = np.abs(w[:, 1::2]) * np.sign(w[:, 0::2])
    path = save_graph([helper.make_node("Conv", ["input", "w", "b"], ["c"], name="conv"),
                  helper.make_node("GlobalAveragePool", ["c"], ["p"], name="pool"),
                  helper.make_node("Flatten", ["p"], ["logits"], name="flat")],
                 {"w": w, "b": np.zeros(8)}, tmp_path / "conv.onnx", ["N", 64, 4, 4], ["N", 8])
    pre = tmp_path / "pre.onnx"
    preprocess_for_quantization(path, pre)
    x = rng.uniform(0, 1, size=(16, 64, 4, 4)).astype(np.float32)
    x[:, :, 0, 0] = 1.0  # every channel reaches the calibrated maximum: U8 activations at 255
    return pre, x


def _int8_weights(path) -> np.ndarray:
    g = onnx.load(str(path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    return next(inits[n.input[0]] for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                and inits[n.input[0]].dtype == np.int8 and inits[n.input[0]].ndim == 4)


def test_7bit_weights_run_as_their_own_qdq_arithmetic(saturating_conv, tmp_path):
    """With reduce_range (the default) the weights lie in [-64, 63] and onnxruntime's integer kernels give
    what the QDQ graph means (the same file run without graph optimizations, in float); 8-bit weights use
    the full [-127, 127], and on an x86 CPU without VNNI (this project's AVX2 machine) the kernels' result
    saturates away from what the graph means."""
    pre, x = saturating_conv
    seven, eight = tmp_path / "q7.onnx", tmp_path / "q8.onnx"
    quantize_qdq(pre, seven, x, "input", batch_size=8)
    quantize_qdq(pre, eight, x, "input", batch_size=8, reduce_range=False)
    w7, w8 = _int8_weights(seven), _int8_weights(eight)
    assert 63 <= np.abs(w7).max() <= 64  # 7 bits
    assert np.abs(w8).max() == 127
    kernels = open_onnx(seven).run(None, {"input": x})[0]
    meaning = open_onnx(seven, optimization="disable").run(None, {"input": x})[0]
    np.testing.assert_allclose(kernels, meaning, rtol=1e-3, atol=1e-3 * float(np.abs(meaning).max()))
    fp32 = run_onnx(pre, x)
    assert np.abs(kernels - fp32).max() < 0.05 * np.abs(fp32).max()  # 7 bits still close to float
    # The runtime's verdict on this CPU (runtime.backends.u8s8_saturates, which makes the cpu backend refuse
    # 8-bit INT8 weights) against what its kernels measurably do with them.
    k8 = open_onnx(eight).run(None, {"input": x})[0]
    m8 = open_onnx(eight, optimization="disable").run(None, {"input": x})[0]
    verdict = u8s8_saturates()
    if verdict is None:
        pytest.skip("this CPU's flags cannot be read (x86 outside Linux)")
    if verdict:
        assert np.abs(k8 - m8).max() > 0.1 * np.abs(m8).max(), "8-bit weights should saturate without VNNI"
    else:
        np.testing.assert_allclose(k8, m8, rtol=1e-3, atol=1e-3 * float(np.abs(m8).max()))


def _two_layer_mlp(path):
    rng = np.random.default_rng(1)
    return save_graph([helper.make_node("MatMul", ["input", "w1"], ["h"], name="fc1"),
                  helper.make_node("Relu", ["h"], ["r"], name="relu"),
                  helper.make_node("MatMul", ["r", "w2"], ["logits"], name="fc2")],
                 {"w1": rng.normal(size=(16, 32)), "w2": rng.normal(size=(32, 4))}, path, ["N", 16], ["N", 4])


def test_guard_keeps_nodes_in_float_until_decisions_reach_the_floor(tmp_path):
    """Calibrated on inputs 20x too small, the INT8 model clips; with no accuracy budget to hold, the guard
    keeps the fully quantized model unless asked for a decision floor, then keeps nodes in float until the
    decisions (label or unknown, through the trust section) agree as the floor asks, judged by the Wilson
    interval of the agreement (upper bound at or above the floor, as the parity gate judges)."""
    fp32 = _two_layer_mlp(tmp_path / "mlp.onnx")
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    logits = run_onnx(fp32, x)
    y = logits.argmax(1)
    trust = Trust(temperature=1.0, ood=OODSpec(threshold=float(np.quantile(ood_score(logits), 0.2))))
    calib = x[:40] * 0.05

    free = quantize_int8(fp32, tmp_path / "a.onnx", calib, x, y, max_accuracy_drop=1.0)
    assert free.budget_met and free.excluded_nodes == [] and free.decision_agreement is None

    res = quantize_int8(fp32, tmp_path / "b.onnx", calib, x, y, max_accuracy_drop=1.0,
                        min_decision_agreement=0.99, trust=trust)
    first = res.attempts[0]
    assert first["excluded"] == 0 and first["decision_agreement"] < 0.9, "bad calibration should change decisions"
    assert res.budget_met and res.excluded_nodes and res.decision_interval[1] >= 0.99
    assert res.min_decision_agreement == 0.99 and res.to_dict()["decision_agreement"] == res.decision_agreement
    kept = run_onnx(tmp_path / "b.onnx", x)
    assert same_decisions(logits, kept, trust).mean() == pytest.approx(res.decision_agreement)
    # No node may stay in float: the floor cannot hold, the result says so and keeps the quantized model.
    none = quantize_int8(fp32, tmp_path / "c.onnx", calib, x, y, max_accuracy_drop=1.0, max_excluded_nodes=0,
                         min_decision_agreement=0.99, trust=trust)
    assert not none.budget_met and none.excluded_nodes == [] and none.decision_agreement < 0.9


def test_same_decisions_counts_unknown_changes_and_ties():
    ref = np.array([[5.0, 0.0], [0.0, 5.0], [1.0, 1.0]], np.float32)
    threshold = float(ood_score(ref[2:])[0])
    trust = Trust(temperature=1.0, ood=OODSpec(threshold=threshold + SCORE_TIE / 2))  # image 2: unknown, a tie
    cand = ref.copy()
    cand[0] = [0.0, 5.0]  # label changes
    cand[2] += SCORE_TIE  # crosses the threshold from within the tie band
    assert same_decisions(ref, cand, trust).tolist() == [False, True, True]
    assert same_decisions(ref, cand, None).tolist() == [False, True, True]  # labels alone
    cand[1] = [-20.0, -20.0]  # same label, now far below the threshold: unknown
    assert same_decisions(ref, cand, trust).tolist() == [False, False, True]


@pytest.fixture()
def rounding_bias(tmp_path):
    """Depthwise 3x3 convolutions whose eight small weights a channel all round the same way in 7 bits
    (0.0123 of a channel maximum of 1 -> 1/64): the INT8 model's outputs are all shifted one way, by about
    8 * 0.0033 * mean input, a bias no per-channel scale can remove."""
    rng = np.random.default_rng(3)
    w = np.full((4, 1, 3, 3), 0.0123)
    w[:, 0, 1, 1] = 1.0
    path = save_graph([helper.make_node("Conv", ["input", "w", "b"], ["c"], name="dw", group=4, pads=[1, 1, 1, 1]),
                  helper.make_node("GlobalAveragePool", ["c"], ["p"], name="pool"),
                  helper.make_node("Flatten", ["p"], ["logits"], name="flat")],
                 {"w": w, "b": np.zeros(4)}, tmp_path / "dw.onnx", ["N", 4, 8, 8], ["N", 4])
    x = rng.uniform(0, 10, size=(64, 4, 8, 8)).astype(np.float32)
    return path, x


def test_bias_correction_removes_the_mean_shift_of_rounded_weights(rounding_bias, tmp_path):
    from exporters.bias_correction import bias_shifts, quantized_weights

    fp32, x = rounding_bias
    ref = run_onnx(fp32, x)
    y = ref.argmax(1)
    plain = quantize_int8(fp32, tmp_path / "plain.onnx", x[:32], x, y, bias_correction=False, rounding="nearest")
    fixed = quantize_int8(fp32, tmp_path / "fixed.onnx", x[:32], x, y, rounding="nearest")
    assert plain.bias_correction == {} and fixed.bias_correction["nodes"] == 1 and fixed.bias_correction["used"]
    assert fixed.bias_correction["with"]["excluded"] == fixed.bias_correction["without"]["excluded"] == 0
    err_plain = (run_onnx(tmp_path / "plain.onnx", x) - ref).mean(0)
    err_fixed = (run_onnx(tmp_path / "fixed.onnx", x) - ref).mean(0)
    # 8 weights x (1/64 - 0.0123) x mean input ~5 x (interior share of the padded border) ~ +0.13 per channel
    assert np.all(err_plain > 0.08), err_plain
    assert np.abs(err_fixed).max() < np.abs(err_plain).min() / 5, (err_plain, err_fixed)
    # the shift is (W_q - W) applied to the mean input, with W_q as the QDQ model stores it
    wq = quantized_weights(tmp_path / "plain.onnx")["dw"]
    assert np.allclose(wq[0, 0, 0, 0], 1 / 64, atol=1e-6) and np.allclose(wq[0, 0, 1, 1], 1.0, atol=1e-6)
    pre = tmp_path / "pre.onnx"
    preprocess_for_quantization(fp32, pre)
    shifts = bias_shifts(pre, tmp_path / "plain.onnx", x[:32])
    assert np.allclose(shifts["dw"], err_plain, atol=0.02)


def test_nodes_kept_in_float_take_the_node_before_their_activation():
    """The QDQ quantizer folds a Clip into the previous node's output quantization only when the next
    node is quantized: keeping that next node in float keeps the one before it in float too."""
    import tempfile
    from pathlib import Path

    from exporters.sensitivity import with_activation_producers

    rng = np.random.default_rng(4)
    with tempfile.TemporaryDirectory() as d:
        path = save_graph([helper.make_node("Conv", ["input", "w1"], ["c1"], name="conv1"),
                      helper.make_node("Clip", ["c1", "lo", "hi"], ["a1"], name="relu6"),
                      helper.make_node("Conv", ["a1", "w2"], ["c2"], name="conv2"),
                      helper.make_node("Conv", ["c2", "w3"], ["c3"], name="conv3"),
                      helper.make_node("GlobalAveragePool", ["c3"], ["p"], name="pool"),
                      helper.make_node("Flatten", ["p"], ["logits"], name="flat")],
                     {"w1": rng.normal(size=(4, 3, 1, 1)), "w2": rng.normal(size=(4, 4, 1, 1)),
                      "w3": rng.normal(size=(4, 4, 1, 1)), "lo": np.array(0.0), "hi": np.array(6.0)},
                     Path(d) / "m.onnx", ["N", 3, 4, 4], ["N", 4])
        assert with_activation_producers(path, ["conv2"]) == ["conv2", "conv1"]
        assert with_activation_producers(path, ["conv3"]) == ["conv3"]  # no activation between them
        assert with_activation_producers(path, ["conv2", "conv1"]) == ["conv2", "conv1"]


def test_nodes_rank_by_how_far_their_int8_weights_move_the_logits(tmp_path):
    """Of two convolutions, the one whose weights sit on the 7-bit grid moves nothing; the other ranks first.
    Without weight ranking (a model over the size cap) the list is empty and the guard ranks by noise alone."""
    from exporters.bias_correction import rank_by_weight_error
    from exporters.quantize import _interleave

    rng = np.random.default_rng(5)
    off = np.full((4, 1, 3, 3), 0.0123)
    off[:, 0, 1, 1] = 1.0
    on = rng.integers(-64, 65, size=(4, 4, 1, 1)) / 64.0
    on[:, 0, 0, 0] = 1.0  # each output channel's maximum is 1: scale 1/64, every weight on the grid
    path = save_graph([helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="grid", group=1),
                  helper.make_node("Conv", ["c1", "w2", "b2"], ["c2"], name="offgrid", group=4, pads=[1, 1, 1, 1]),
                  helper.make_node("GlobalAveragePool", ["c2"], ["p"], name="pool"),
                  helper.make_node("Flatten", ["p"], ["logits"], name="flat")],
                 {"w1": on, "b1": np.zeros(4), "w2": off, "b2": np.zeros(4)}, tmp_path / "two.onnx",
                 ["N", 4, 8, 8], ["N", 4])
    pre = tmp_path / "pre.onnx"
    preprocess_for_quantization(path, pre)
    x = rng.uniform(0, 10, size=(32, 4, 8, 8)).astype(np.float32)
    quantize_qdq(pre, tmp_path / "q.onnx", x, "input")
    ranked = rank_by_weight_error(pre, tmp_path / "q.onnx", x[:8], tmp_path)
    assert [name for name, _ in ranked] == ["offgrid", "grid"]
    assert ranked[0][1] > 0.05 and ranked[1][1] < 1e-4, ranked
    assert rank_by_weight_error(pre, tmp_path / "q.onnx", x[:8], tmp_path, max_weight_bytes=10) == []
    assert _interleave([("a", 1), ("b", 0)], [("c", 1), ("a", 0), ("d", 0)]) == ["a", "c", "b", "d"]
    assert _interleave([], [("c", 1), ("d", 0)]) == ["c", "d"]


def test_bias_correction_of_a_gemm_with_transposed_weights(tmp_path):
    """A Gemm as PyTorch's Linear exports it (transB=1) is corrected; one with beta 0.5 is left alone, because
    onnxruntime's quantizer rewrites its beta to 1."""
    rng = np.random.default_rng(6)
    w = np.full((4, 16), 0.0123)
    w[:, 0] = 1.0
    x = rng.uniform(0, 10, size=(64, 16)).astype(np.float32)
    for beta, corrected in ((1.0, True), (0.5, False)):
        path = save_graph([helper.make_node("Gemm", ["input", "w", "b"], ["logits"], name="fc", transB=1, beta=beta)],
                     {"w": w, "b": np.zeros(4)}, tmp_path / f"fc{beta}.onnx", ["N", 16], ["N", 4])
        ref = run_onnx(path, x)
        res = quantize_int8(path, tmp_path / "q.onnx", x[:32], x, ref.argmax(1), rounding="nearest")
        assert res.bias_correction["nodes"] == int(corrected)
        err = (run_onnx(tmp_path / "q.onnx", x) - ref).mean(0)
        if corrected:
            assert np.abs(err).max() < 0.05, err  # 15 x (1/64 - 0.0123) x 5 = 0.25 without the correction
        else:
            assert np.all(err > 0.2), err
