import json

from click.testing import CliRunner

from pipeline.cli import cli
from runtime.bundle import parse_manifest, read_bundle, sha256_file, write_manifest


def test_run_directory_layout_and_metrics(tiny_run):
    _, run_dir, out = tiny_run
    for f in ("config.yaml", "split.json", "metrics.json", "checkpoints/teacher.safetensors",
              "checkpoints/student.safetensors", "bundle/bundle.json", "bundle/model.onnx"):
        assert (run_dir / f).is_file(), f
    assert not list(run_dir.rglob("*.tmp")) and not list(run_dir.glob(".bundle*"))
    m = json.loads((run_dir / "metrics.json").read_text())
    assert set(m) == {"teacher", "student", "onnx", "validate", "deploy", "trust"}
    # Tiny compact CNNs on 3 real digit classes: well above chance (1/3).
    assert m["teacher"]["test_accuracy"] >= 0.6
    assert m["student"]["test_accuracy"] >= 0.6
    assert m["validate"]["agreement"] == 1.0
    assert m["validate"]["max_abs_logit_diff"] <= 1e-4
    assert abs(m["onnx"]["accuracy"] - m["student"]["test_accuracy"]) < 1e-6
    assert out.parity.passed and out.export.agreement == 1.0 and out.distill.model == "compact_cnn_w0.5"
    # Every candidate (teacher and student, fp32 and int8 by default, on each backend here) measured; the
    # tiny config ships the smallest: the student's INT8 model.
    d = m["deploy"]
    assert {(c["model"], c["precision"]) for c in d["candidates"]} == {
        ("student", "fp32"), ("student", "int8"), ("teacher", "fp32"), ("teacher", "int8")}
    assert {c["backend"] for c in d["candidates"]} >= {"cpu"}
    assert (d["chosen"]["model"], d["chosen"]["artifact"], d["objective"]) == ("student", "onnx_int8", "size")
    assert read_bundle(run_dir / "bundle").manifest.default_artifact == "onnx_int8"
    assert all(c["agreement_n"] > c["n"] > 0 for c in d["candidates"])
    assert read_bundle(run_dir / "candidates" / "teacher").manifest.model.role == "teacher"  # kept, loadable
    assert (run_dir / "pareto.png").is_file() and "![Pareto front](pareto.png)" in (run_dir / "report.md").read_text()


def test_bundle_json_is_self_describing(tiny_run):
    _, run_dir, _ = tiny_run
    m = read_bundle(run_dir / "bundle").manifest
    assert json.loads((run_dir / "bundle" / "bundle.json").read_text())["schema_version"] == m.schema_version == 4
    assert m.class_names == ["digit0", "digit1", "digit2"]
    assert m.preprocess.crop == 32 and m.preprocess.mean == (0.5, 0.5, 0.5)
    assert m.input.name == "input" and m.output.name == "logits"
    assert m.opset >= 17
    assert m.files["model.onnx"].sha256 == sha256_file(run_dir / "bundle" / "model.onnx")
    assert m.parity.test["agreement"] == 1.0 and m.artifacts["onnx"].parity["agreement"] == 1.0
    assert m.artifacts["onnx"].runtimes == ["cpu", "cuda", "tensorrt", "openvino"]
    assert m.model.role == "student"
    assert "test_accuracy" in m.metrics


def test_onnx_has_dynamic_batch(tiny_run):
    import onnx

    _, run_dir, _ = tiny_run
    g = onnx.load(str(run_dir / "bundle" / "model.onnx")).graph
    dims = g.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 32, 32]


def test_stage_commands_rerun_alone(run_copy):
    cfg, run_dir = run_copy
    r = CliRunner().invoke(cli, ["export", str(cfg), "--model", "teacher", "--out", str(run_dir / "teacher-bundle")])
    assert r.exit_code == 0, r.output
    assert read_bundle(run_dir / "teacher-bundle").manifest.model.role == "teacher"
    r = CliRunner().invoke(cli, ["validate", str(cfg), "--bundle", str(run_dir / "teacher-bundle")])
    assert r.exit_code == 0, r.output
    assert "agreement 100.00%" in r.output and r.output.strip().endswith("parity: OK")


def test_validate_fails_on_wrong_normalization_and_names_flipped_images(run_copy):
    cfg, run_dir = run_copy
    bundle = run_dir / "bundle"
    meta = json.loads((bundle / "bundle.json").read_text())
    meta["preprocess"]["mean"] = [0.0, 0.0, 0.0]  # the classic mismatch: wrong normalization
    meta["preprocess"]["std"] = [1.0, 1.0, 1.0]
    write_manifest(bundle, parse_manifest(meta))  # re-hashed, so it is the preprocessing that is wrong
    r = CliRunner().invoke(cli, ["validate", str(cfg)])
    assert r.exit_code == 1
    assert "error: parity check failed: top-1 agreement" in r.output and "max |Δlogit|" in r.output
    report = json.loads((run_dir / "metrics.json").read_text())["validate"]
    assert not report["passed"] and report["agreement"] < 1.0
    assert report["flipped"], "wrong normalization should flip labels"
    for f in report["flipped"][:5]:
        assert f["image"] in r.output


def test_export_failure_leaves_previous_bundle_untouched(run_copy):
    cfg, run_dir = run_copy
    before = sha256_file(run_dir / "bundle" / "bundle.json")
    (run_dir / "checkpoints" / "student.safetensors").write_bytes(b"truncated")
    r = CliRunner().invoke(cli, ["export", str(cfg)])
    assert r.exit_code == 1 and "not a readable safetensors checkpoint" in r.output
    assert sha256_file(run_dir / "bundle" / "bundle.json") == before
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".bundle")]


def test_help_for_every_command():
    for cmd in ([], ["demo"], ["run"], ["adapt"], ["distill"], ["export"], ["validate"], ["predict"]):
        r = CliRunner().invoke(cli, [*cmd, "--help"])
        assert r.exit_code == 0 and "Usage:" in r.output
