"""OpenVINO: backend `openvino` (runtime.backends.openvino), the OpenVINO artifacts (exporters.openvino)
through the parity gate, bench, Triton repository and the server, and its one-line errors."""

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

import runtime
from runtime.backends import OpenVINOOptions, create_session
from runtime.backends.openvino import supported_precisions
from runtime.bundle import parse_manifest, read_bundle, write_manifest
from runtime.serve import create_app
from tests.test_server import (  # noqa: F401  the server's tritonclient and 4xx tests, rerun on backend openvino
    _settings, images, running_server, test_bad_input_gets_a_clear_4xx_and_the_server_keeps_serving,
    test_tritonclient_health_metadata_and_infer,
)

pytest.importorskip("openvino")
HAS_BF16 = "bf16" in supported_precisions("CPU")


@pytest.fixture(scope="module")
def bundle_dir(tiny_run):
    return tiny_run[1] / "bundle"


@pytest.fixture(scope="module")
def clf(bundle_dir):
    return runtime.load(bundle_dir, backend="openvino", intra_op_threads=1, artifact="onnx")  # the FP32 model


@pytest.fixture(scope="module")
def server(bundle_dir, clf):
    with running_server(create_app(_settings(bundle_dir, backend="openvino"), classifier=clf)) as url:
        yield url


def _cli(*args):
    from pipeline.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def test_openvino_agrees_with_cpu_label_for_label_and_logs_what_it_runs_on(bundle_dir, clf, tiny_data, caplog):
    paths = sorted(tiny_data.rglob("*.png"))
    cpu = runtime.load(bundle_dir, backend="cpu", artifact="onnx")
    a, b = clf.logits(paths), cpu.logits(paths)
    assert (a.argmax(1) == b.argmax(1)).all() and np.abs(a - b).max() <= 1e-4
    assert clf.backend == "openvino" and clf.provider.startswith("OpenVINO CPU, f32")
    assert clf.session.runs_on["precision"] == "f32" and clf.session.runs_on["devices"] == ["CPU"]
    with caplog.at_level("INFO", logger="edgekiln.runtime"):
        create_session("openvino", read_bundle(bundle_dir), options=OpenVINOOptions(hint="throughput", streams=2))
    assert "openvino runs model.onnx on CPU (inference precision f32, hint throughput, streams 2" in caplog.text


def test_openvino_predicts_without_importing_torch(bundle_dir, tiny_data):
    img = sorted(tiny_data.rglob("*.png"))[0]
    code = textwrap.dedent(f"""
        import sys
        import runtime
        clf = runtime.load({str(bundle_dir)!r}, backend="openvino")
        print(clf.predict([{str(img)!r}])[0].label, clf.backend)
        assert 'torch' not in sys.modules, 'torch was imported'
        """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    label, backend = r.stdout.split()
    assert backend == "openvino" and label == runtime.load(bundle_dir).predict([img])[0].label


def test_unknown_and_unavailable_device_are_one_line_errors(bundle_dir):
    r = _cli("serve", bundle_dir, "--backend", "openvino", "--artifact", "onnx", "--openvino-device", "TPU", "--port", "1")
    assert r.exit_code == 2
    assert r.output.strip().splitlines() == [
        "error: openvino device 'TPU' is not one of CPU, GPU, NPU, AUTO (GPU.1 picks the second GPU)"]
    import openvino

    if "GPU" in " ".join(openvino.Core().available_devices):
        pytest.skip("this machine has an OpenVINO GPU")
    r = _cli("serve", bundle_dir, "--backend", "openvino", "--artifact", "onnx", "--openvino-device", "GPU", "--port", "1")
    assert r.exit_code == 1
    devices = ", ".join([*openvino.Core().available_devices, "AUTO"])
    assert r.output.strip().splitlines() == [
        f"error: backend 'openvino': device GPU is not available here (available: {devices})"]


def test_openvino_options_need_backend_openvino(bundle_dir):
    r = _cli("serve", bundle_dir, "--backend", "cpu", "--openvino-hint", "throughput", "--port", "1")
    assert r.exit_code == 2 and "--openvino-* options apply only to --backend openvino" in r.output
    with pytest.raises(runtime.BackendError, match="backend 'cpu' takes no backend options"):
        create_session("cpu", read_bundle(bundle_dir), options=OpenVINOOptions())


def test_a_missing_openvino_package_is_one_line(bundle_dir):
    code = ("import sys; sys.modules['openvino'] = None\n"  # what `import openvino` meets where it is not installed
            "from pipeline.cli import main\n"
            f"sys.argv = ['edgekiln', 'serve', {str(bundle_dir)!r}, '--backend', 'openvino', '--port', '1']\nmain()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "error: backend 'openvino' needs the openvino package, which is not installed; "
        "install it with: pip install 'edgekiln[openvino]'"]


def test_bf16_on_a_cpu_without_bf16_is_one_line(bundle_dir, run_copy):
    if HAS_BF16:
        pytest.skip("this CPU runs bf16")
    r = _cli("serve", bundle_dir, "--backend", "openvino", "--artifact", "onnx", "--openvino-precision", "bf16", "--port", "1")
    assert r.exit_code == 1
    assert len(r.output.strip().splitlines()) == 1
    assert "cannot run inference precision bf16 (it runs: f32" in r.output
    cfg, run_dir = run_copy  # and an export asking for it stops before any slow step
    r = _cli("export", cfg, "--openvino", "bf16", "--out", run_dir / "ov")
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1
    assert "cannot run inference precision bf16" in r.output and not (run_dir / "ov").exists()


@pytest.fixture(scope="module")
def ov_bundle(tiny_run, tmp_path_factory):
    """The tiny teacher exported with onnxruntime INT8 and every OpenVINO artifact this CPU can check."""
    cfg_path, run_dir, _ = tiny_run
    base = tmp_path_factory.mktemp("ov")
    shutil.copytree(run_dir, base / "runs" / run_dir.name)  # export writes metrics.json: leave the shared run alone
    d = yaml.safe_load(cfg_path.read_text())
    d["runs_dir"] = str(base / "runs")
    d["export"] = {"precisions": ["int8"], "calibration_size": 30,
                   "openvino": {"precisions": ["fp32", "fp16", "int8"] + (["bf16"] if HAS_BF16 else [])}}
    cfg = base / "ov.yaml"
    cfg.write_text(yaml.safe_dump(d))
    out = cfg.parent / "bundle"
    repo = cfg.parent / "triton"
    r = _cli("export", cfg, "--model", "teacher", "--out", out, "--triton-repo", repo, "--triton-artifact", "openvino_int8")
    assert r.exit_code == 0, r.output
    return out, repo, r.output


def test_openvino_artifacts_pass_the_parity_gate_through_backend_openvino(ov_bundle):
    out, _, output = ov_bundle
    m = read_bundle(out).manifest  # verifies every sha256, the IR's .bin files included
    assert {"model.bin", "model.fp16.bin", "model.int8.bin"} <= set(m.files)
    ov = {k: a for k, a in m.artifacts.items() if a.format == "openvino"}
    assert set(ov) == {"openvino", "openvino_fp16", "openvino_int8"} | ({"openvino_bf16"} if HAS_BF16 else set())
    assert all(a.runtimes == ["openvino"] and a.parity["passed"] for a in ov.values())
    fp32 = ov["openvino"].parity
    assert fp32["agreement"] == 1.0 and fp32["max_abs_logit_diff"] <= 1e-4
    assert ov["openvino_fp16"].precision == "fp16" and m.files["model.fp16.bin"].bytes < m.files["model.bin"].bytes
    assert m.parity.golden["artifacts"]["openvino"]["passed"] and m.parity.golden["artifacts"]["openvino"]["strict"]
    guard = ov["openvino_int8"].details["quantization"]["guard"]
    assert guard["method"] == "accuracy_control" and guard["budget"] == 0.01 and guard["quantized_ops"] > 0
    assert abs(guard["accuracy_drop"] - (guard["fp32_accuracy"] - guard["int8_accuracy"])) < 1e-12
    # our onnxruntime INT8 guard and NNCF's, side by side in the export's output
    assert "int8 onnxruntime + edgekiln guard (onnx_int8, guard): val drop" in output
    assert "int8 NNCF (openvino_int8, accuracy_control): val drop" in output


def test_triton_repository_serves_openvino_ir_with_its_backend(ov_bundle):
    from exporters.triton import parse_config_pbtxt

    _, repo, _ = ov_bundle
    model = next(repo.iterdir())
    cfg = parse_config_pbtxt((model / "config.pbtxt").read_text(), minimal=True)
    assert cfg.backend == "openvino" and not cfg.platform
    assert cfg.parameters["PERFORMANCE_HINT"].string_value == "LATENCY"
    assert sorted(p.name for p in (model / "1").iterdir()) == ["model.bin", "model.xml"]
    import openvino

    compiled = openvino.Core().compile_model(str(model / "1" / "model.xml"), "CPU")  # the .bin found next to it
    assert compiled.outputs[0].get_partial_shape()[1].get_length() == 3


def test_bench_rows_per_artifact_backend_and_hint(ov_bundle, tmp_path):
    out, _, _ = ov_bundle
    r = _cli("bench", out, "--rounds", "5", "--out", tmp_path / "b")
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    got = {(row["artifact"], row["backend"], row["hint"]) for row in rows}
    assert {("onnx", "onnxruntime-cpu", ""), ("onnx", "openvino-CPU", "f32"), ("onnx_int8", "onnxruntime-cpu", ""),
            ("onnx_int8", "openvino-CPU", "f32"), ("openvino", "openvino-CPU", "f32"),
            ("openvino_int8", "openvino-CPU", "f32")} <= got
    gated = [row for row in rows if row["parity"] is not None]
    assert len(gated) == len(read_bundle(out).manifest.artifacts) and all(row["parity_mark"] == "✅" for row in gated)
    assert all(row["latency_p50_ms"] > 0 for row in rows)
    assert "openvino_int8 on openvino-CPU (f32) / onnx_int8 on onnxruntime-cpu, measured side by side" in r.output


def test_auto_picks_the_faster_of_the_backends_that_passed_parity_and_says_why(ov_bundle, bundle_dir, caplog):
    out, _, _ = ov_bundle
    with caplog.at_level("INFO", logger="edgekiln.runtime"):
        clf = runtime.load(out, backend="auto", artifact="onnx")
    line = next(r.getMessage() for r in caplog.records if "auto chose" in r.getMessage())
    assert "fastest here of the backends whose artifact passed parity (openvino model.xml" in line
    assert "vs cpu model.onnx" in line and f"auto chose backend '{clf.backend}'" in line
    assert clf.session.model_file == {"openvino": "model.xml", "cpu": "model.onnx"}[clf.backend]
    caplog.clear()
    with caplog.at_level("INFO", logger="edgekiln.runtime"):
        assert runtime.load(bundle_dir, backend="auto", artifact="onnx").backend == "cpu"  # no OpenVINO artifact: nothing to time
    assert "for model.onnx (the bundle has no OpenVINO twin of 'onnx')" in caplog.text


def test_auto_runs_the_openvino_int8_twin_where_onnxruntime_would_saturate_8bit_weights(ov_bundle, tmp_path, monkeypatch,
                                                                                       caplog):
    """An INT8 ONNX artifact with 8-bit weights on an x86 CPU without VNNI (flags substituted): `auto` runs the
    OpenVINO INT8 artifact, which passed parity too, and says why."""
    from runtime.backends import ort as ort_backend

    out, _, _ = ov_bundle
    bundle = tmp_path / "bundle"
    shutil.copytree(out, bundle)
    meta = json.loads((bundle / "bundle.json").read_text())
    meta["artifacts"]["onnx_int8"]["details"]["quantization"]["weight_bits"] = 8
    write_manifest(bundle, parse_manifest(meta))
    monkeypatch.setattr(ort_backend.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(ort_backend, "_cpu_flags", lambda: frozenset({"avx2"}))
    with caplog.at_level("INFO", logger="edgekiln.runtime"):
        clf = runtime.load(bundle, backend="auto", artifact="onnx_int8")
    assert clf.backend == "openvino" and clf.session.model_file == "model.int8.xml"
    assert "auto chose backend 'openvino'" in caplog.text and "model.int8.onnx has 8-bit INT8 weights" in caplog.text
    with pytest.raises(runtime.BackendError, match="8-bit INT8 weights"):
        runtime.load(bundle, artifact="onnx_int8")  # the cpu backend, named: refused, no fallback
