"""Every artifact of a tiny bundle (FP32, FP16, INT8 ONNX), the parity gate over
them, golden images, the self-test, and a deliberately broken artifact."""

import json
import shutil

import numpy as np
import onnx
import pytest
import yaml
from click.testing import CliRunner

from pipeline.cli import cli
from runtime.bundle import parse_manifest, read_bundle, write_manifest


_EXPORTED: dict = {}


@pytest.fixture(scope="session")
def exported(tiny_run, tmp_path_factory):
    """A private copy of the tiny run, exported once with fp16 + int8 and a Triton repository.

    Other test_export_* modules import this fixture; the memo makes it run once per session."""
    if not _EXPORTED:
        _EXPORTED["v"] = _export(tiny_run, tmp_path_factory)
    return _EXPORTED["v"]


def _export(tiny_run, tmp_path_factory):
    cfg_path, run_dir, _ = tiny_run
    base = tmp_path_factory.mktemp("export")
    shutil.copytree(run_dir, base / "runs" / run_dir.name)
    d = yaml.safe_load(cfg_path.read_text())
    d["runs_dir"] = str(base / "runs")
    d["export"] = {"precisions": ["fp32", "fp16", "int8"], "calibration_size": 20, "golden_images": 5}
    cfg = base / "pipeline.yaml"
    cfg.write_text(yaml.safe_dump(d))
    r = CliRunner().invoke(cli, ["export", str(cfg), "--model", "student", "--triton-repo", str(base / "triton")])
    assert r.exit_code == 0, r.output
    return cfg, base / "runs" / run_dir.name, base / "triton", r.output


def test_export_writes_every_requested_artifact_with_parity(exported):
    _, run_dir, _, output = exported
    m = read_bundle(run_dir / "bundle").manifest  # verifies every sha256
    arts = m.artifacts
    assert {k: (a.file, a.format, a.precision) for k, a in arts.items()} == {
        "onnx": ("model.onnx", "onnx", "fp32"),
        "onnx_fp16": ("model.fp16.onnx", "onnx", "fp16"),
        "onnx_int8": ("model.int8.onnx", "onnx", "int8"),
    }
    parity = {k: a.parity for k, a in arts.items()}
    assert set(parity) == set(arts) and all(p["passed"] for p in parity.values())
    assert parity["onnx"]["agreement"] == 1.0 and parity["onnx"]["max_abs_logit_diff"] <= 1e-3
    assert parity["onnx_fp16"]["agreement"] >= 0.995
    # 9 test images: the INT8 drop is judged by its paired interval, agreement on the larger agreement set.
    assert parity["onnx_int8"]["drop_stats"]["low"] <= 0.01 and parity["onnx_int8"]["drop_stats"]["n"] == 9
    assert parity["onnx_int8"]["agreement_interval"][1] >= 0.75
    for p in parity.values():
        assert {"kl_divergence", "per_class_accuracy_delta", "flipped", "accuracy_delta", "drop_stats"} <= set(p)
        # test split (9) + validation as is (7) + 1 augmented view of each of the 16 held-out images
        assert p["agreement_n"] == 32 and p["agreement_sources"] == {"test": 9, "held_out_as_is": 7,
                                                                       "augmented_views": 16, "unlabeled": 0}
        assert set(p["per_class_accuracy_delta"]) == set(m.class_names)
    assert m.parity.test["artifact"] == "model.onnx"  # the FP32 report, as before
    assert "✅ onnx_int8: model.int8.onnx" in output and "✅ onnx_fp16: model.fp16.onnx" in output


def test_int8_is_qdq_per_channel_and_reports_calibration(exported):
    _, run_dir, _, output = exported
    m = read_bundle(run_dir / "bundle").manifest
    q = m.artifacts["onnx_int8"].details["quantization"]
    cal = q["calibration"]
    # 20 images over 3 classes, stratified: 7/7/6, all from the training split.
    assert cal["split"] == "train" and cal["images"] == 20 and sorted(cal["per_class"].values()) == [6, 7, 7]
    assert set(cal["per_class"]) == set(m.class_names)
    assert "int8 calibration: 20 train images, per class digit0:7, digit1:7, digit2:6" in output
    assert q["format"] == "QDQ" and q["guard"]["split"] == "val" and q["guard"]["budget"] == 0.01
    g = onnx.load(str(run_dir / "bundle" / "model.int8.onnx")).graph
    ops = [n.op_type for n in g.node]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > 0
    inits = {t.name: t for t in g.initializer}
    conv_w = [inits[n.input[0]] for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
              and inits[n.input[0]].data_type == onnx.TensorProto.INT8 and len(inits[n.input[0]].dims) == 4]
    assert conv_w, "conv weights should be stored as int8"
    scales = [inits[n.input[1]] for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
              and inits[n.input[0]].data_type == onnx.TensorProto.INT8 and len(inits[n.input[0]].dims) == 4]
    assert all(len(s.dims) == 1 and s.dims[0] > 1 for s in scales), "weights should be quantized per channel"
    # Clip/Relu after a quantized conv are folded into the quantized range; one stays only where the
    # accuracy guard kept its producer in float (which nodes it keeps depends on onnxruntime's version).
    kept_float = set(q["guard"]["excluded_nodes"])
    producer = {o: n for n in g.node for o in n.output}
    left = [n for n in g.node if n.op_type in ("Relu", "Clip")]
    assert all(producer[n.input[0]].name in kept_float for n in left), [n.name for n in left]
    assert len(left) <= len(kept_float)


def test_fp16_keeps_float32_io(exported):
    from runtime.backends.ort import open_onnx

    _, run_dir, _, _ = exported
    sess = open_onnx(str(run_dir / "bundle" / "model.fp16.onnx"))
    assert sess.get_inputs()[0].type == "tensor(float)" and sess.get_outputs()[0].type == "tensor(float)"
    m = onnx.load(str(run_dir / "bundle" / "model.fp16.onnx"))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in m.graph.initializer)


def test_golden_images_in_bundle_match_format_and_self_test(exported):
    _, run_dir, _, _ = exported
    bundle = run_dir / "bundle"
    m = read_bundle(bundle).manifest
    g = m.golden
    assert set(g.model_dump()) == {"files", "logits", "atol", "artifacts"} and g.atol == 1e-3
    # Reduced-precision artifacts are held to their own export-time logits, within their distance from FP32.
    assert set(g.artifacts) == {"onnx_fp16", "onnx_int8"}
    for own in g.artifacts.values():
        assert np.asarray(own.logits).shape == (5, len(m.class_names)) and own.atol >= g.atol
        assert own.atol >= np.abs(np.asarray(own.logits) - np.asarray(g.logits)).max() - 1e-6
    assert g.files == [f"golden-{i:02d}.png" for i in range(5)]
    assert all((bundle / f).is_file() and f in m.files for f in g.files)  # hashed like every file
    assert np.asarray(g.logits).shape == (5, len(m.class_names))
    # One golden image per class first (round-robin over the test split).
    split = json.loads((run_dir / "split.json").read_text())
    first = [next(p for p, y in split["test"] if y == c) for c in range(3)]
    for name, src in zip(g.files, first):
        assert (bundle / name).read_bytes() == (__import__("pathlib").Path(split["root"]) / src).read_bytes()
    r = CliRunner().invoke(cli, ["validate", "--bundle", str(bundle)])
    assert r.exit_code == 0, r.output
    assert "✅ onnx: max |Δlogit|" in r.output and r.output.strip().endswith("self-test: OK (5 golden images)")
    assert "✅ onnx_int8: max |Δlogit|" in r.output and "not gated" not in r.output
    import runtime

    assert runtime.load(bundle, artifact="onnx_int8").self_test().max_abs_diff <= g.artifacts["onnx_int8"].atol


def test_int8_self_test_fails_when_its_own_golden_logits_disagree(exported, tmp_path):
    import runtime
    from runtime.errors import ParityError

    _, run_dir, _, _ = exported
    bundle = tmp_path / "bundle"
    shutil.copytree(run_dir / "bundle", bundle)
    meta = json.loads((bundle / "bundle.json").read_text())
    own = meta["golden"]["artifacts"]["onnx_int8"]
    own["logits"][1] = [x + 3 * own["atol"] + 1.0 for x in own["logits"][1]]
    write_manifest(bundle, parse_manifest(meta))
    r = CliRunner().invoke(cli, ["validate", "--bundle", str(bundle)])
    assert r.exit_code == 1 and "❌ onnx_int8" in r.output and "✅ onnx:" in r.output
    with pytest.raises(ParityError, match=r"self-test failed on backend 'cpu' \(onnx_int8\): .*worst image golden-01"):
        runtime.load(bundle, artifact="onnx_int8").self_test()


def test_cpu_backend_refuses_8bit_int8_weights_where_its_kernels_saturate(exported, tmp_path, monkeypatch):
    """onnxruntime's U8 x S8 kernels on an x86 CPU without VNNI saturate 8-bit weights, so such an INT8
    artifact would not answer as its parity gate certified: the cpu backend refuses it there (one line),
    the parity gate reports it as not checked on this machine, and 7-bit weights (the default) load."""
    import runtime
    from runtime.backends import Int8KernelsSaturate, int8_weight_bits
    from runtime.backends import ort as ort_backend

    _, run_dir, _, _ = exported
    assert read_bundle(run_dir / "bundle").manifest.artifacts["onnx_int8"].details["quantization"]["weight_bits"] == 7
    bundle = tmp_path / "bundle"
    shutil.copytree(run_dir / "bundle", bundle)
    meta = json.loads((bundle / "bundle.json").read_text())
    meta["artifacts"]["onnx_int8"]["details"]["quantization"]["weight_bits"] = 8
    write_manifest(bundle, parse_manifest(meta))
    assert int8_weight_bits(read_bundle(bundle).manifest.artifacts["onnx_int8"]) == 8
    monkeypatch.setattr(ort_backend.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(ort_backend, "_cpu_flags", lambda: frozenset({"sse4_1", "avx2", "avx512bw"}))
    with pytest.raises(Int8KernelsSaturate) as e:
        runtime.load(bundle, artifact="onnx_int8")
    assert "\n" not in str(e.value)
    assert "model.int8.onnx has 8-bit INT8 weights" in str(e.value) and "export.int8_reduce_range: true" in str(e.value)
    assert runtime.load(run_dir / "bundle", artifact="onnx_int8").self_test().passed  # 7-bit weights: load and run
    assert runtime.load(bundle, artifact="onnx").self_test().passed  # the same bundle's FP32 artifact
    with pytest.raises(runtime.BackendError, match=r"backend 'auto': no backend could start .*cpu: backend 'cpu': "
                                                   r"model.int8.onnx has 8-bit INT8 weights"):
        runtime.load(bundle, backend="auto", artifact="onnx_int8")  # no OpenVINO twin here: auto says why
    r = CliRunner().invoke(cli, ["validate", "--bundle", str(bundle)])
    # the self-test says why it skipped the artifact, as for a TensorRT engine built for another GPU
    assert r.exit_code == 0 and "onnx_int8: skipped (backend 'cpu': model.int8.onnx has 8-bit INT8 weights" in r.output
    monkeypatch.setattr(ort_backend, "_cpu_flags", lambda: frozenset({"avx2", "avx_vnni"}))  # VNNI: no saturation
    runtime.load(bundle, artifact="onnx_int8")
    monkeypatch.setattr(ort_backend.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(ort_backend, "_cpu_flags", lambda: None)
    runtime.load(bundle, artifact="onnx_int8")


def test_u8s8_saturation_by_cpu():
    from runtime.backends import u8s8_saturates

    assert u8s8_saturates("x86_64", frozenset({"sse4_1", "avx2"})) is True
    assert u8s8_saturates("AMD64", frozenset({"avx2", "avx512bw", "avx512_4vnniw"})) is True  # Knights Mill's is not VNNI
    assert u8s8_saturates("x86_64", frozenset({"avx2", "avx512_vnni"})) is False
    assert u8s8_saturates("x86_64", frozenset({"avx2", "avx_vnni"})) is False
    assert u8s8_saturates("aarch64", frozenset()) is False and u8s8_saturates("arm64") is False


def test_self_test_fails_when_golden_logits_disagree(exported, tmp_path):
    _, run_dir, _, _ = exported
    bundle = tmp_path / "bundle"
    shutil.copytree(run_dir / "bundle", bundle)
    meta = json.loads((bundle / "bundle.json").read_text())
    meta["golden"]["logits"][0] = [-x for x in meta["golden"]["logits"][0]]
    write_manifest(bundle, parse_manifest(meta))
    r = CliRunner().invoke(cli, ["validate", "--bundle", str(bundle)])
    assert r.exit_code == 1
    assert "error: self-test failed: onnx (model.onnx): max |Δlogit|" in r.output


def test_validate_checks_every_artifact(exported):
    cfg, _, _, _ = exported
    r = CliRunner().invoke(cli, ["validate", str(cfg)])
    assert r.exit_code == 0, r.output
    for key in ("onnx", "onnx_fp16", "onnx_int8"):
        assert f"✅ {key} (" in r.output
    assert "golden self-test: 5 images, OK" in r.output and r.output.strip().endswith("parity: OK")


def _scale_input(src, dst, factor: float):
    """The classic broken export: the model file itself normalizes wrongly (x * factor at the input)."""
    m = onnx.load(str(src))
    inp = m.graph.input[0].name
    for n in m.graph.node:
        for i, name in enumerate(n.input):
            if name == inp:
                n.input[i] = "wrongly_normalized"
    m.graph.initializer.append(onnx.numpy_helper.from_array(np.array(factor, dtype=np.float32), "bad_scale"))
    m.graph.node.insert(0, onnx.helper.make_node("Mul", [inp, "bad_scale"], ["wrongly_normalized"]))
    onnx.save(m, str(dst))


def test_broken_artifact_fails_validate_naming_artifact_and_flipped_images(exported, tmp_path):
    cfg, run_dir, _, _ = exported
    bundle = tmp_path / "broken"
    shutil.copytree(run_dir / "bundle", bundle)
    _scale_input(run_dir / "bundle" / "model.int8.onnx", bundle / "model.int8.onnx", -3.0)
    write_manifest(bundle, read_bundle(bundle, verify=False).manifest)  # re-hash: the file is "valid"
    r = CliRunner().invoke(cli, ["validate", str(cfg), "--bundle", str(bundle)])
    assert r.exit_code == 1
    assert "❌ onnx_int8 (model.int8.onnx, int8)" in r.output and "✅ onnx (model.onnx, fp32)" in r.output
    # 9 labeled test images cannot prove an accuracy drop; agreement on 32 images shows the break.
    assert "FAILED onnx_int8: top-1 agreement" in r.output
    assert "error: parity check failed: top-1 agreement" in r.output and "[onnx_int8]" in r.output
    report = json.loads((run_dir / "metrics.json").read_text())["validate"]["artifacts"]["onnx_int8"]
    assert report["flipped"] and not report["passed"]
    for f in report["flipped"][:5]:
        assert f["image"] in r.output


def test_int8_guard_excludes_sensitive_nodes_until_budget_holds(exported, tmp_path):
    """Calibrated on images 20x too dark, the INT8 model clips every activation; the guard
    ranks nodes by the noise they add and keeps the worst in float until the budget holds."""
    from exporters.quantize import quantize_int8
    from pipeline.data import Split
    from runtime.preprocess import preprocess

    _, run_dir, _, _ = exported
    spec = read_bundle(run_dir / "bundle").preprocess
    split = Split.load(run_dir / "split.json")
    calib = preprocess(split.paths("train")[:12], spec) * 0.05
    # Every image of the split as the guard set: enough to show the drop (the guard judges it like the gate).
    parts = ("train", "val", "test")
    gx = preprocess([p for part in parts for p in split.paths(part)], spec)
    gy = np.asarray([y for part in parts for y in split.labels(part)])
    res = quantize_int8(run_dir / "bundle" / "model.onnx", tmp_path / "q.onnx", calib, gx, gy, max_accuracy_drop=0.0,
                        max_excluded_nodes=64)
    first = res.attempts[0]
    assert first["excluded"] == 0 and first["accuracy_drop"] > 0.0, "bad calibration should cost accuracy"
    assert len(res.attempts) > 1 and res.excluded_nodes
    assert [a["excluded"] for a in res.attempts[1:]] == sorted(a["excluded"] for a in res.attempts[1:])
    assert res.budget_met and res.drop_stats["low"] <= 0.0 < first["accuracy_drop"]
    assert res.accuracy_drop < first["accuracy_drop"]
    assert (tmp_path / "q.onnx").is_file()
    # No budget left to spend: the result says it could not hold.
    res0 = quantize_int8(run_dir / "bundle" / "model.onnx", tmp_path / "q0.onnx", calib, gx, gy,
                         max_accuracy_drop=0.0, max_excluded_nodes=0)
    assert not res0.budget_met and res0.excluded_nodes == [] and res0.to_dict()["accuracy_drop"] > 0
