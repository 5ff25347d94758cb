"""The runtime's native TensorRT engine backend ('tensorrt-engine'): the fingerprint check,
the install hint, the opt-in ONNX fallback, `auto`, and `edgekiln serve --allow-engine-fallback`.

All but the last tests run without TensorRT or a GPU; those need both and skip elsewhere.
"""

import importlib
import logging
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

import runtime
from runtime.backends import ENGINE_FALLBACK_ENV, check_engine_fingerprint
from runtime.bundle import Artifact, read_bundle, write_manifest
from runtime.errors import BackendError, BundleError, ConfigError
from runtime.gpu_info import CudaDevice, _driver, engine_fingerprint, fingerprint_mismatch, gpu_info

BUILT = {"tensorrt": "10.3.0", "gpu": "NVIDIA A10", "compute_capability": "8.6"}


def _tensorrt_imports() -> bool:
    try:
        importlib.import_module("tensorrt")
    except (ImportError, OSError):
        return False
    return True


def _engine_ready() -> tuple[bool, str]:
    import onnxruntime as ort

    if not _tensorrt_imports():
        return False, "needs tensorrt and a CUDA GPU (tensorrt does not import here)"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False, "needs tensorrt and a CUDA GPU (onnxruntime-gpu's CUDAExecutionProvider is missing)"
    try:
        info = gpu_info(0)
    except BackendError as e:
        return False, f"needs tensorrt and a CUDA GPU ({e})"
    return (info is not None), "needs tensorrt and a CUDA GPU (no GPU here)"


TRT_IMPORTS = _tensorrt_imports()
ENGINE_OK, ENGINE_WHY = _engine_ready()
needs_engine = pytest.mark.skipif(not ENGINE_OK, reason=ENGINE_WHY)
without_tensorrt = pytest.mark.skipif(TRT_IMPORTS, reason="tensorrt imports here; the missing-tensorrt path cannot run")


def _only_cpu_provider() -> bool:
    import onnxruntime as ort

    return not {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(ort.get_available_providers())


def _add_engine(bundle, data: bytes = b"not a TensorRT engine", fingerprint=BUILT):
    """A 'tensorrt' artifact as exporters/artifacts.py records it (hash-verified like every file)."""
    (bundle / "model.plan").write_bytes(data)
    m = read_bundle(bundle, verify=False).manifest
    engine = Artifact(file="model.plan", format="tensorrt", precision="fp16", fingerprint=fingerprint,
                      details={"workspace_mb": 1024, "profile": {"min": 1, "opt": 8, "max": 32}})
    # The FP32 ONNX model is the default, as when export ships for a GPU: auto then tries the engine first.
    write_manifest(bundle, m.model_copy(update={"artifacts": {**m.artifacts, "tensorrt": engine},
                                                "default_artifact": "onnx"}))
    return bundle


@pytest.fixture
def engine_bundle(run_copy):
    """The tiny run's bundle plus an engine that cannot run on this machine."""
    _, run_dir = run_copy
    return _add_engine(run_dir / "bundle")


@pytest.fixture
def runtime_logs(caplog):
    caplog.set_level(logging.INFO, logger="edgekiln.runtime")
    return caplog


# ------------------------------------------------------------------ fingerprint


def test_fingerprint_mismatch_names_each_difference():
    assert fingerprint_mismatch(BUILT, dict(BUILT)) == []
    here = {"tensorrt": "10.8.0", "gpu": "NVIDIA L4", "compute_capability": "8.9"}
    assert fingerprint_mismatch(BUILT, here) == [
        "tensorrt: engine built for '10.3.0', this machine has '10.8.0'",
        "compute_capability: engine built for '8.6', this machine has '8.9'",
        "gpu: engine built for 'NVIDIA A10', this machine has 'NVIDIA L4'",
    ]
    assert fingerprint_mismatch({}, BUILT)[0] == "tensorrt: engine built for None, this machine has '10.3.0'"


def test_exporter_and_runtime_share_one_comparison():
    from exporters import tensorrt as exporter

    assert exporter.fingerprint_mismatch is fingerprint_mismatch


def test_engine_for_another_gpu_is_refused_naming_each_difference():
    here = dict(BUILT, gpu="NVIDIA L4", compute_capability="8.9")
    with pytest.raises(BackendError) as e:
        check_engine_fingerprint("model.plan", BUILT, here)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("backend 'tensorrt-engine': model.plan was built for another machine "
                          "(compute_capability: engine built for '8.6', this machine has '8.9'; "
                          "gpu: engine built for 'NVIDIA A10', this machine has 'NVIDIA L4'); ")
    assert "edgekiln export CONFIG --tensorrt" in msg and "--allow-engine-fallback" in msg
    check_engine_fingerprint("model.plan", BUILT, dict(BUILT))  # a match passes
    with pytest.raises(BackendError, match="bundle.json records no fingerprint for model.plan"):
        check_engine_fingerprint("model.plan", None, BUILT)


@pytest.mark.skipif(_driver() is not None, reason="this machine has an NVIDIA driver library")
def test_gpu_info_without_a_driver_is_none():
    assert gpu_info(0) is None
    assert engine_fingerprint("10.3.0", 0) is None
    with pytest.raises(BackendError, match=r"^no CUDA GPU here \(the NVIDIA driver library is missing"):
        CudaDevice(0)


# ----------------------------------------------------------- named backend, no fallback


def test_engine_backend_without_an_engine_is_a_bundle_error(tiny_run):
    _, run_dir, _ = tiny_run
    with pytest.raises(BundleError, match=r"bundle has no 'tensorrt' artifact \(has: onnx"):
        runtime.load(run_dir / "bundle", backend="tensorrt-engine")


@without_tensorrt
def test_engine_backend_without_tensorrt_is_one_line_with_the_install_hint(engine_bundle):
    with pytest.raises(BackendError) as e:
        runtime.load(engine_bundle, backend="tensorrt-engine")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("backend 'tensorrt-engine': the tensorrt Python package does not import here (")
    assert "pip install 'tensorrt>=10,<11'" in msg and "allow_engine_fallback=True" in msg


# ------------------------------------------------------------------ allowed fallback


@without_tensorrt
def test_allowed_fallback_runs_the_onnx_model_with_a_warning(engine_bundle, tiny_data, runtime_logs):
    if not _only_cpu_provider():
        pytest.skip("GPU providers present: the fallback's backend depends on the machine's libraries")
    files = sorted(tiny_data.rglob("*.png"))[:6]
    clf = runtime.load(engine_bundle, backend="tensorrt-engine", allow_engine_fallback=True)
    assert clf.backend == "cpu" and clf.provider == "CPUExecutionProvider"
    warnings = [r.getMessage() for r in runtime_logs.records
                if r.name == "edgekiln.runtime" and r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("edgekiln runtime: backend 'tensorrt-engine' cannot run here: "
                                  "the tensorrt Python package does not import here (")
    assert warnings[0].endswith("Falling back, as allowed (allow_engine_fallback), to model.onnx on onnxruntime "
                                "backend 'cpu' (CPUExecutionProvider)")
    cpu = runtime.load(engine_bundle, backend="cpu")
    assert np.array_equal(clf.logits(files), cpu.logits(files))
    assert [p.label for p in clf.predict(files)] == [p.label for p in cpu.predict(files)]


def test_allowed_fallback_without_an_engine_warns_the_same_way(tiny_run, runtime_logs):
    if not _only_cpu_provider():
        pytest.skip("GPU providers present: the fallback's backend depends on the machine's libraries")
    _, run_dir, _ = tiny_run
    clf = runtime.load(run_dir / "bundle", backend="tensorrt-engine", allow_engine_fallback=True)
    assert clf.backend == "cpu"
    warnings = [r.getMessage() for r in runtime_logs.records if r.levelno == logging.WARNING]
    assert warnings == ["edgekiln runtime: backend 'tensorrt-engine' cannot run here: the bundle has no 'tensorrt' "
                        "artifact. Falling back, as allowed (allow_engine_fallback), to model.onnx on onnxruntime "
                        "backend 'cpu' (CPUExecutionProvider)"]


def test_fallback_from_the_environment(tiny_run, monkeypatch):
    if not _only_cpu_provider():
        pytest.skip("GPU providers present: the fallback's backend depends on the machine's libraries")
    _, run_dir, _ = tiny_run
    monkeypatch.setenv(ENGINE_FALLBACK_ENV, "1")
    assert runtime.load(run_dir / "bundle", backend="tensorrt-engine").backend == "cpu"
    monkeypatch.setenv(ENGINE_FALLBACK_ENV, "0")
    with pytest.raises(BundleError, match="bundle has no 'tensorrt' artifact"):
        runtime.load(run_dir / "bundle", backend="tensorrt-engine")
    monkeypatch.setenv(ENGINE_FALLBACK_ENV, "sure")
    with pytest.raises(ConfigError, match=r"\$EDGEKILN_ALLOW_ENGINE_FALLBACK='sure' is not a boolean; use 1 or 0"):
        runtime.load(run_dir / "bundle", backend="tensorrt-engine")


@without_tensorrt
def test_fallback_path_never_imports_torch(engine_bundle):
    code = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        import runtime
        clf = runtime.load({str(engine_bundle)!r}, backend="tensorrt-engine", allow_engine_fallback=True)
        clf.run(np.zeros((1, *clf.input_shape), np.float32))
        import runtime.gpu_info
        runtime.gpu_info.gpu_info(0)
        assert 'torch' not in sys.modules, 'torch was imported'
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------------------ auto


def test_auto_skips_the_engine_when_the_bundle_has_none(tiny_run, runtime_logs):
    if not _only_cpu_provider():
        pytest.skip("GPU providers present: which one starts depends on the machine's libraries")
    _, run_dir, _ = tiny_run
    assert runtime.load(run_dir / "bundle", backend="auto", artifact="onnx").backend == "cpu"
    lines = [r.getMessage() for r in runtime_logs.records]
    assert lines[0] == "edgekiln runtime: auto: skipping backend 'tensorrt-engine': bundle has no 'tensorrt' artifact"
    assert lines[1] == ("edgekiln runtime: auto chose backend 'cpu' (CPUExecutionProvider) for model.onnx (the bundle "
                        "has no OpenVINO twin of 'onnx'); "
                        "skipped tensorrt: no TensorrtExecutionProvider; cuda: no CUDAExecutionProvider")
    assert not [r for r in runtime_logs.records if r.levelno >= logging.WARNING]


@without_tensorrt
def test_auto_tries_the_engine_first_and_logs_why_it_was_skipped(engine_bundle, runtime_logs):
    if not _only_cpu_provider():
        pytest.skip("GPU providers present: which one starts depends on the machine's libraries")
    assert runtime.load(engine_bundle, backend="auto").backend == "cpu"
    warnings = [r.getMessage() for r in runtime_logs.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(
        "edgekiln runtime: auto: skipping backend 'tensorrt-engine': the tensorrt Python package does not import here")
    text = "\n".join(r.getMessage() for r in runtime_logs.records)
    assert "auto chose backend 'cpu' (CPUExecutionProvider) for model.onnx" in text


# ------------------------------------------------------------------------- CLI


def test_serve_lists_the_fallback_flag():
    from pipeline.cli import cli

    r = CliRunner().invoke(cli, ["serve", "--help"])
    assert r.exit_code == 0 and "--allow-engine-fallback" in r.output


def test_serve_fallback_flag_needs_the_engine_backend(tiny_run):
    from pipeline.cli import cli

    _, run_dir, _ = tiny_run
    r = CliRunner().invoke(cli, ["serve", str(run_dir / "bundle"), "--backend", "cpu", "--allow-engine-fallback"])
    assert r.exit_code == 2
    assert r.output.strip() == ("error: --allow-engine-fallback applies only to --backend tensorrt-engine "
                                "(got --backend cpu)")


@without_tensorrt
def test_serve_engine_without_tensorrt_fails_in_one_line(engine_bundle):
    from pipeline.cli import cli

    r = CliRunner().invoke(cli, ["serve", str(engine_bundle), "--backend", "tensorrt-engine"])
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: backend 'tensorrt-engine': the tensorrt Python package")
    assert "pip install 'tensorrt>=10,<11'" in lines[0] and "--allow-engine-fallback" in lines[0]


# -------------------------------------------------- a real engine (TensorRT + CUDA GPU)


@pytest.fixture
def real_engine_bundle(run_copy):
    from pipeline.cli import cli

    cfg, run_dir = run_copy
    d = yaml.safe_load(cfg.read_text())
    d["export"] = {"tensorrt": {"enabled": True, "precision": "fp32", "opt_batch": 4, "max_batch": 16}}
    cfg.write_text(yaml.safe_dump(d))
    r = CliRunner().invoke(cli, ["export", str(cfg)])
    assert r.exit_code == 0, r.output
    return run_dir / "bundle"


@pytest.mark.tensorrt
@pytest.mark.gpu
@needs_engine
def test_real_engine_matches_cpu_and_auto_prefers_it(real_engine_bundle, tiny_data):
    files = sorted(tiny_data.rglob("*.png"))[:40]  # more than the profile's max batch: split into calls
    cpu = runtime.load(real_engine_bundle, backend="cpu").logits(files)
    eng = runtime.load(real_engine_bundle, backend="tensorrt-engine")
    assert eng.backend == "tensorrt-engine" and eng.provider.startswith("TensorRT ")
    assert np.abs(eng.logits(files) - cpu).max() <= 1e-3
    assert eng.logits(files[:1]).shape == (1, len(eng.class_names))  # padded up to the profile's min and back
    assert runtime.load(real_engine_bundle, backend="auto").backend == "tensorrt-engine"


@pytest.mark.tensorrt
@pytest.mark.gpu
@needs_engine
def test_real_engine_for_another_gpu_is_refused_unless_fallback_is_allowed(real_engine_bundle, runtime_logs):
    m = read_bundle(real_engine_bundle).manifest
    here = m.artifacts["tensorrt"].fingerprint
    assert here == engine_fingerprint(here["tensorrt"], 0)  # the exporter (torch) and the runtime (driver) agree
    engine = m.artifacts["tensorrt"].model_copy(update={"fingerprint": dict(here, gpu="NVIDIA Imaginary 9000")})
    write_manifest(real_engine_bundle, m.model_copy(update={"artifacts": {**m.artifacts, "tensorrt": engine}}))
    with pytest.raises(BackendError, match=r"model.plan was built for another machine \(gpu: engine built for "
                                           r"'NVIDIA Imaginary 9000', this machine has "):
        runtime.load(real_engine_bundle, backend="tensorrt-engine")
    clf = runtime.load(real_engine_bundle, backend="tensorrt-engine", allow_engine_fallback=True)
    assert clf.backend in ("tensorrt", "cuda", "cpu")
    assert any(r.levelno == logging.WARNING and "NVIDIA Imaginary 9000" in r.getMessage()
               and f"onnxruntime backend '{clf.backend}'" in r.getMessage() for r in runtime_logs.records)


def test_profile_batches_split_pad_and_trim():
    from runtime.backends import run_in_profile_batches

    seen = []

    def run_one(piece):  # a stand-in engine: rows -> their sums, and record each piece's size
        seen.append(len(piece))
        return piece.reshape(len(piece), -1).sum(1, keepdims=True)

    x = np.arange(7 * 2, dtype=np.float32).reshape(7, 2)
    out = run_in_profile_batches(x, min_batch=2, max_batch=3, run_one=run_one)
    assert seen == [3, 3, 2]  # the last piece (1 row) padded up to the profile's min of 2
    assert np.array_equal(out, x.sum(1, keepdims=True))  # padding rows dropped, order kept
    seen.clear()
    assert run_in_profile_batches(x[:2], 1, 32, run_one).shape == (2, 1) and seen == [2]
