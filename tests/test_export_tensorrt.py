"""TensorRT: engine tests run wherever `tensorrt` imports and a CUDA GPU is present;
elsewhere they skip with the install hint, and the CLI target fails in one line."""

import pytest
import yaml
from click.testing import CliRunner

from exporters.tensorrt import INSTALL_HINT, fingerprint_mismatch, tensorrt_available
from pipeline.cli import cli

TRT_OK, TRT_WHY = tensorrt_available()
needs_trt = pytest.mark.skipif(not TRT_OK, reason=TRT_WHY)


def test_fingerprint_mismatch_names_each_difference():
    built = {"tensorrt": "10.3.0", "gpu": "NVIDIA A10", "compute_capability": "8.6"}
    assert fingerprint_mismatch(built, dict(built)) == []
    here = {"tensorrt": "10.3.0", "gpu": "NVIDIA L4", "compute_capability": "8.9"}
    assert fingerprint_mismatch(built, here) == [
        "compute_capability: engine built for '8.6', this machine has '8.9'",
        "gpu: engine built for 'NVIDIA A10', this machine has 'NVIDIA L4'",
    ]


@pytest.mark.skipif(TRT_OK, reason="tensorrt is installed here; the missing-tensorrt message cannot be shown")
def test_tensorrt_target_fails_in_one_line_with_install_hint(run_copy):
    cfg, run_dir = run_copy
    before = (run_dir / "bundle" / "bundle.json").read_bytes()
    r = CliRunner().invoke(cli, ["export", str(cfg), "--tensorrt"])
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the 'tensorrt' target needs") and "pip install" in lines[0]
    assert (run_dir / "bundle" / "bundle.json").read_bytes() == before  # checked before any slow step
    # The same through the config file.
    d = yaml.safe_load(cfg.read_text())
    d["export"] = {"tensorrt": {"enabled": True}}
    cfg.write_text(yaml.safe_dump(d))
    r = CliRunner().invoke(cli, ["export", str(cfg)])
    assert r.exit_code == 1 and "pip install" in r.output


def test_install_hint_is_one_actionable_line():
    assert "\n" not in INSTALL_HINT and "pip install 'tensorrt>=10,<11'" in INSTALL_HINT


@pytest.mark.tensorrt
@pytest.mark.gpu
@needs_trt
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_engine_builds_passes_parity_and_records_fingerprint(run_copy, precision):
    from runtime.bundle import read_bundle

    cfg, run_dir = run_copy
    d = yaml.safe_load(cfg.read_text())
    d["export"] = {"calibration_size": 16, "tensorrt": {"enabled": True, "precision": precision, "opt_batch": 4,
                                                         "max_batch": 16}}
    cfg.write_text(yaml.safe_dump(d))
    r = CliRunner().invoke(cli, ["export", str(cfg)])
    assert r.exit_code == 0, r.output
    art = read_bundle(run_dir / "bundle").manifest.artifacts["tensorrt"]
    assert art.file == "model.plan" and art.precision == precision
    assert set(art.fingerprint) == {"tensorrt", "gpu", "compute_capability"}
    assert art.details["profile"] == {"min": 1, "opt": 4, "max": 16}
    assert art.parity["passed"]
    assert (run_dir / "tensorrt-cache" / "timing.cache").is_file()
    if precision == "int8":
        assert (run_dir / "tensorrt-cache" / "student.calib").is_file()
