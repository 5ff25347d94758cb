"""Bounded INT8 calibration: images stream a batch at a time, ranges are reduced after every batch
(and come out the same as in one pass), calibrated once and reused, and a model that cannot fit is
refused before calibration starts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from exporters.calibration import ImageSource, SourceCalibrationReader
from exporters.onnx_export import export_onnx
from exporters.quantize import plan_memory, preprocess_for_quantization, quantize_qdq, run_onnx
from exporters.resources import MemoryBudgetError, measured
from pipeline.models import create_model


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory):
    d = tmp_path_factory.mktemp("mem")
    torch.manual_seed(0)
    export_onnx(create_model("compact_cnn_w0.5", 3, "none").eval(), 32, d / "m.onnx")
    preprocess_for_quantization(d / "m.onnx", d / "pre.onnx")
    return d


def test_reader_streams_batches_and_answers_strided_calibration():
    x = np.arange(10 * 3 * 2 * 2, dtype=np.float32).reshape(10, 3, 2, 2)
    r = SourceCalibrationReader(ImageSource(array=x), "input", batch_size=4)
    assert len(r) == 3
    r.set_range(1, 3)
    got = [r.get_next() for _ in range(3)]
    assert got[2] is None and np.array_equal(got[0]["input"], x[4:8]) and np.array_equal(got[1]["input"], x[8:])


def test_strided_calibration_gives_the_one_pass_ranges_and_is_cached(small_onnx, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((24, 3, 32, 32), dtype=np.float32)
    pre = small_onnx / "pre.onnx"
    one, strided = tmp_path / "one.json", tmp_path / "strided.json"
    quantize_qdq(pre, tmp_path / "a.onnx", x, "input", calibration_cache=one, batch_size=24)
    quantize_qdq(pre, tmp_path / "b.onnx", x, "input", calibration_cache=strided, batch_size=5)
    a, b = json.loads(one.read_text())["data"], json.loads(strided.read_text())["data"]
    assert a.keys() == b.keys() and len(a) > 5
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    # The cache alone quantizes (no images): every guard attempt reuses the first calibration.
    quantize_qdq(pre, tmp_path / "c.onnx", None, "input", nodes_to_exclude=[], calibration_cache=strided)
    probe = x[:4]
    assert np.array_equal(run_onnx(tmp_path / "b.onnx", probe), run_onnx(tmp_path / "c.onnx", probe))


def test_a_model_that_cannot_fit_is_refused_before_calibration(small_onnx):
    plan = plan_memory(small_onnx / "pre.onnx", available=8 * 10**9)
    assert plan.weights_bytes > 0 and plan.activation_bytes_per_image > 0 and 1 <= plan.batch <= 16
    with pytest.raises(MemoryBudgetError) as e:
        plan_memory(small_onnx / "pre.onnx", available=10_000)
    msg = str(e.value)
    assert "needs about" in msg and "available" in msg and "export.precisions" in msg and "\n" not in msg


def test_measured_records_time_and_peak():
    with measured() as cost:
        block = np.ones(50_000_000, dtype=np.uint8)  # 50 MB touched
        block[::4096] = 2
    assert cost["seconds"] >= 0 and cost["peak_rss_mb"] >= 50


def test_a_full_disk_in_quantization_preprocessing_is_not_retried(small_onnx, tmp_path, monkeypatch):
    """Disk full while onnxruntime's pre-processing writes its model: the OSError reaches the CLI's one
    line (the fallback without symbolic shapes used to re-read the half-written file and die on a
    protobuf DecodeError traceback)."""
    import errno

    from onnxruntime.quantization import shape_inference

    calls = []

    def full_disk(src, dst, **kw):
        calls.append(kw)
        with open(dst, "wb") as f:
            f.write(b"\x08\x01half")  # what a write cut short by ENOSPC leaves behind
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(shape_inference, "quant_pre_process", full_disk)
    with pytest.raises(OSError) as e:
        preprocess_for_quantization(small_onnx, tmp_path / "pre.onnx")
    assert e.value.errno == errno.ENOSPC and len(calls) == 1
