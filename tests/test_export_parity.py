"""The parity routine on hand-made logits: every figure and every failure line."""

import numpy as np
import pytest

from exporters.parity import GateResult, Thresholds, compare_logits, kl_divergence


def _logits():
    # 6 images, 3 classes; PyTorch gets 5/6 right (image 5 is wrong).
    ref = np.array([[5, 0, 0], [0, 5, 0], [0, 0, 5], [5, 0, 0], [0, 5, 0], [5, 0, 0]], dtype=np.float64)
    labels = np.array([0, 1, 2, 0, 1, 2])
    return ref, labels


def test_identical_logits_pass_every_check():
    ref, labels = _logits()
    r = compare_logits("m.onnx", ref, ref.copy(), labels, Thresholds(max_accuracy_drop=0.0, max_kl=1e-9))
    assert r.passed and r.agreement == 1.0 and r.max_abs_logit_diff == 0.0 and r.kl_divergence == pytest.approx(0.0)
    assert r.reference_accuracy == pytest.approx(5 / 6) and r.accuracy_delta == 0.0
    assert r.per_class_accuracy_delta == {"0": 0.0, "1": 0.0, "2": 0.0}


def test_flip_is_named_with_per_class_delta_and_accuracy_drop():
    ref, labels = _logits()
    cand = ref.copy()
    cand[1] = [0, 0, 5]  # image 1 (class 1) flips 1 -> 2: a correct answer lost
    names = [f"img{i}.png" for i in range(6)]
    r = compare_logits("m.int8.onnx", ref, cand, labels, Thresholds(min_agreement=None, max_abs_logit_diff=None,
                                                                    max_accuracy_drop=0.01), names, "int8",
                       ["zero", "one", "two"])
    assert r.flipped == [{"image": "img1.png", "label": 1, "pytorch": 1, "artifact": 2}]
    assert r.accuracy_delta == pytest.approx(-1 / 6)
    assert r.per_class_accuracy_delta == {"zero": 0.0, "one": pytest.approx(-0.5), "two": 0.0}
    # One flip in six images is no evidence of a drop over 1 point: the paired interval says so.
    assert r.failures == [] and r.drop_stats["b"] == 1 and r.drop_stats["c"] == 0 and r.drop_stats["n"] == 6
    assert r.drop_stats["low"] < 0.01 < r.drop_stats["high"]
    assert r.precision == "int8" and r.thresholds == {"max_accuracy_drop": 0.01}
    assert r.kl_divergence > 0.1


def test_fp32_thresholds_name_flipped_images_and_logit_diff():
    ref, labels = _logits()
    cand = ref + 1e-2
    cand[3] = [0, 0, 5]
    r = compare_logits("model.onnx", ref, cand, labels, Thresholds(), [f"f{i}" for i in range(6)])
    assert r.failures[0].startswith("top-1 agreement 83.33% < 100.00% on 6 images (1 test images flipped: f3)")
    assert r.failures[1] == "max |Δlogit| 5 > 0.001"


def test_kl_divergence_is_zero_for_shifted_logits():
    ref, _ = _logits()
    assert kl_divergence(ref, ref + 3.0) == pytest.approx(0.0, abs=1e-12)
    assert kl_divergence(ref, -ref) > 1.0


def test_gate_result_names_artifact_of_each_failure():
    ref, labels = _logits()
    ok = compare_logits("model.onnx", ref, ref, labels, Thresholds())
    bad = compare_logits("model.fp16.onnx", ref, -ref, labels, Thresholds(min_agreement=0.995, max_abs_logit_diff=None),
                         precision="fp16")
    gate = GateResult({"onnx": ok, "onnx_fp16": bad})
    assert not gate.passed and gate.primary is ok and gate.agreement == 1.0
    assert len(gate.failures) == 1 and gate.failures[0].endswith("[onnx_fp16]")
    d = gate.to_dict()
    assert d["passed"] is False and set(d["artifacts"]) == {"onnx", "onnx_fp16"}
