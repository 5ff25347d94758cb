"""Choosing the deployable by measurement: budgets, objective, the no-candidate exit, the default
artifact the runtime opens, and the end-of-run table."""

import json

import pytest
import yaml
from click.testing import CliRunner

from exporters.config import DeployConfig
from exporters.deploy import Candidate, choose, set_default
from pipeline.cli import cli
from runtime.bundle import read_bundle, sha256_file


def _cand(model, precision, ms, mb, acc, passed=True):
    return Candidate(model=model, arch="a", artifact="onnx" if precision == "fp32" else f"onnx_{precision}",
                     file="m.onnx", format="onnx", precision=precision, backend="cpu", bundle="b", size_mb=mb,
                     accuracy=acc, accuracy_drop=0.0, drop_low=-0.01, drop_high=0.01, n=360, agreement=1.0,
                     agreement_n=2000, latency_p50_ms=ms, throughput_ips=1000 / ms, passed=passed,
                     failures=[] if passed else ["accuracy drop 5.00 points exceeds 1.00 beyond doubt"])


def test_only_int8_meets_the_latency_budget_so_int8_is_chosen():
    cands = [_cand("teacher", "fp32", 3.4, 13.5, 0.95), _cand("teacher", "int8", 1.8, 3.8, 0.944),
             _cand("student", "fp32", 2.6, 6.1, 0.97), _cand("student", "int8", 1.2, 1.8, 0.90, passed=False)]
    # Objective accuracy: the student fp32 would win, but only the teacher's INT8 is within 2 ms and passed.
    choice = choose(cands, DeployConfig(max_latency_ms=2.0, objective="accuracy"))
    assert choice.chosen is cands[1] and cands[1].chosen and not any(c.chosen for c in cands[2:])
    assert cands[0].missed == ["latency 3.40 ms > 2"] and cands[2].missed == ["latency 2.60 ms > 2"]
    assert cands[3].missed == ["parity: accuracy drop 5.00 points exceeds 1.00 beyond doubt"]
    assert choice.reason.startswith("teacher onnx int8 on cpu was chosen as the most accurate of the 1 of 4 "
                                    "candidates that passed their parity gates and met the budgets (max_latency_ms 2)")


def test_objectives_and_pareto_front():
    cands = [_cand("teacher", "fp32", 3.4, 13.5, 0.95), _cand("teacher", "int8", 1.8, 3.8, 0.944),
             _cand("student", "fp32", 2.6, 6.1, 0.97)]
    assert choose(cands, DeployConfig()).chosen is cands[1]  # latency
    assert choose(cands, DeployConfig(objective="size")).chosen is cands[1]
    assert choose(cands, DeployConfig(objective="accuracy")).chosen is cands[2]
    # teacher fp32 is slower, bigger and less accurate than the student fp32: off the front.
    assert [c.pareto for c in cands] == [False, True, True]


def test_macro_f1_as_the_metric_ships_the_model_that_serves_the_rare_class():
    """On imbalanced data the most accurate candidate can be the one that ignores a rare class:
    with deploy.metric macro_f1 (data.select_metric's default) the choice, its tie-breaks and the
    Pareto front go by macro-F1."""
    common = _cand("teacher", "fp32", 3.0, 13.5, 0.93)  # right on the common class, never on the rare one
    rare = _cand("student", "fp32", 3.0, 6.1, 0.91)  # a little less accurate, but gets the rare class
    common.macro_f1, rare.macro_f1 = 0.48, 0.80
    assert choose([common, rare], DeployConfig(objective="accuracy")).chosen is common
    choice = choose([common, rare], DeployConfig(objective="accuracy", metric="macro_f1"))
    assert choice.chosen is rare and [common.pareto, rare.pareto] == [False, True]
    assert "chosen as the highest macro-F1 of the 2 of 2" in choice.reason and "macro-F1 0.8000" in choice.reason
    # Same latency: the tie goes to the better macro-F1 under objective latency too.
    assert choose([common, rare], DeployConfig(metric="macro_f1")).chosen is rare
    # A record from before macro-F1 was measured ranks by accuracy.
    common.macro_f1 = rare.macro_f1 = None
    assert choose([common, rare], DeployConfig(objective="accuracy", metric="macro_f1")).chosen is common


def test_parity_report_measures_macro_f1_of_both_sides():
    import numpy as np

    from exporters.parity import compare_logits
    from exporters.thresholds import Thresholds

    labels = np.array([0] * 8 + [1] * 2)
    ref = np.eye(2)[labels] * 5.0  # PyTorch: every image right
    art = np.eye(2)[np.zeros(10, int)] * 5.0  # artifact: class 0 for all (accuracy 0.8)
    r = compare_logits("m.onnx", ref, art, labels, Thresholds())
    assert r.reference_macro_f1 == 1.0 and r.artifact_accuracy == pytest.approx(0.8)
    # class 0: precision 0.8, recall 1 -> F1 8/9; class 1: F1 0 -> macro 4/9
    assert r.artifact_macro_f1 == pytest.approx(4 / 9)


def _with_deploy(cfg_path, deploy: dict):
    d = yaml.safe_load(cfg_path.read_text())
    d["deploy"] = deploy
    cfg_path.write_text(yaml.safe_dump(d))


def test_size_budget_only_int8_meets_ships_int8_as_default(run_copy):
    cfg, run_dir = run_copy
    _with_deploy(cfg, {"max_size_mb": 0.05, "latency_rounds": 5})
    r = CliRunner().invoke(cli, ["export", str(cfg), "--model", "student"])
    assert r.exit_code == 0, r.output
    m = read_bundle(run_dir / "bundle").manifest
    assert m.default_artifact == "onnx_int8" and m.default_backend == "cpu" and m.schema_version == 4
    d = json.loads((run_dir / "metrics.json").read_text())["deploy"]
    assert d["chosen"]["artifact"] == "onnx_int8" and d["budgets"] == {"max_size_mb": 0.05}
    fp32 = next(c for c in d["candidates"] if c["precision"] == "fp32")
    assert fp32["missed"] == [f"size {fp32['size_mb']:.2f} MB > 0.05"]
    assert "student onnx int8 on cpu was chosen as the fastest" in r.output
    assert "verdict: shipped student onnx int8 on cpu (onnx_int8)" in r.output
    report = (run_dir / "report.md").read_text()  # `edgekiln export` alone brings report.md up to date
    assert "verdict: shipped student onnx int8 on cpu (onnx_int8)" in report and "budgets: max_size_mb 0.05" in report
    guard = json.loads((run_dir / "metrics.json").read_text())["onnx"]["int8"]["guard"]
    assert "## INT8 quantization (shipped model's INT8 artifact)" in report
    assert f"Bias correction of {guard['bias_correction']['nodes']} node(s)" in report and guard["bias_correction"]["nodes"] > 0
    assert f"Guard on {guard['guard_images']} validation images" in report
    if "skipped" in guard["rounding"]:  # auto: every validation image already got the FP32 model's answer
        assert guard["decision_agreement"] in (None, 1.0) and "Adaptive rounding: skipped (every validation" in report
    else:
        assert f"Adaptive rounding (AdaRound) of {guard['rounding']['nodes']} convolution(s)" in report
    assert "Weights int8 (7-bit range), per-channel, activations uint8." in report and "saturate" not in report


def test_nothing_meets_the_size_budget_exits_1_listing_every_candidate(run_copy):
    cfg, run_dir = run_copy
    before = sha256_file(run_dir / "bundle" / "bundle.json")
    _with_deploy(cfg, {"max_size_mb": 0.001, "latency_rounds": 5})
    r = CliRunner().invoke(cli, ["export", str(cfg), "--model", "student"])
    assert r.exit_code == 1
    d = json.loads((run_dir / "metrics.json").read_text())["deploy"]
    n = len(d["candidates"])  # fp32 and int8, on every backend available here (cpu, openvino, ...)
    assert n >= 2 and n % 2 == 0
    assert ("error: no candidate passed its parity gate and met the deploy budgets (max_size_mb 0.001); "
            f"{n} candidates measured, nothing shipped") in r.output
    assert "Traceback" not in r.output
    rows = [line for line in r.output.splitlines() if "student: compact_cnn_w0.5" in line]
    assert len(rows) == n and all("MB > 0.001" in line for line in rows)
    assert {"fp32", "int8"} == {p for line in rows for p in ("fp32", "int8") if f" {p} " in line}
    assert sha256_file(run_dir / "bundle" / "bundle.json") == before  # the old bundle is untouched
    assert d["chosen"] is None


def test_runtime_load_opens_the_default_artifact(run_copy, tmp_path):
    import runtime

    _, run_dir = run_copy
    bundle = run_dir / "bundle"
    assert runtime.load(bundle).artifact == read_bundle(bundle).manifest.default_artifact
    set_default(bundle, "onnx_int8", "cpu", None)
    clf = runtime.load(bundle, backend="auto")
    assert clf.artifact == "onnx_int8" and clf.session.model_file.endswith("model.int8.onnx")
    assert runtime.load(bundle, artifact="onnx").session.model_file.endswith("model.onnx")
    r = CliRunner().invoke(cli, ["predict", str(bundle), "--no-ood", str(next(bundle.glob("golden-*.png")))])
    assert r.exit_code == 0 and "digit" in r.output


def test_bad_deploy_config_is_one_line_per_problem(tmp_path):
    from pipeline.config import build_config
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        build_config({"data": {"demo": True}, "deploy": {"objective": "speed", "max_size_mb": -1}})
    lines = str(e.value).splitlines()
    assert len(lines) == 2 and lines[0].startswith("config: deploy.max_size_mb:")
    assert lines[1].startswith("config: deploy.objective: Input should be 'latency', 'size' or 'accuracy'")


def test_an_artifact_that_failed_parity_on_one_backend_is_refused_there_only(run_copy):
    import runtime
    from runtime.bundle import write_manifest
    from runtime.errors import BackendError

    _, run_dir = run_copy
    bundle = run_dir / "bundle"
    m = read_bundle(bundle).manifest
    art = m.artifacts["onnx_int8"]
    failed = {"passed": False, "failures": ["accuracy drop 5.00 points exceeds 1.00 beyond doubt"]}
    parity = {**art.parity, "backends": {**(art.parity.get("backends") or {}), "openvino": failed}}
    write_manifest(bundle, m.model_copy(update={"artifacts": {**m.artifacts,
                                                              "onnx_int8": art.model_copy(update={"parity": parity})}}))
    with pytest.raises(BackendError, match=r"artifact 'onnx_int8' \(model.int8.onnx\) failed the parity gate on backend "
                                           r"'openvino' at export \(accuracy drop 5.00 points .*\); run it on cpu"):
        runtime.load(bundle, backend="openvino", artifact="onnx_int8")
    assert runtime.load(bundle, backend="cpu", artifact="onnx_int8").artifact == "onnx_int8"
    r = CliRunner().invoke(cli, ["serve", str(bundle), "--backend", "openvino", "--artifact", "onnx_int8"])
    assert r.exit_code != 0 and "failed the parity gate on backend 'openvino'" in r.output and "Traceback" not in r.output


def test_the_gate_and_the_timing_open_sessions_without_a_line_each_and_predict_still_says_it(tiny_run, caplog):
    import logging

    import runtime
    from exporters.deploy import bundle_candidates, measure
    from exporters.parity import open_runners

    _, run_dir, _ = tiny_run
    bundle = read_bundle(run_dir / "bundle")
    caplog.set_level(logging.INFO, logger="edgekiln.runtime")
    runners, _ = open_runners(bundle, all_backends=True)
    cands = bundle_candidates(bundle)
    measure(cands, {c.bundle: bundle for c in cands}, DeployConfig(latency_rounds=5, batch=2))
    assert len(runners) >= 2 and all(c.latency_p50_ms > 0 for c in cands)
    assert not [r for r in caplog.records if r.name == "edgekiln.runtime"]
    runtime.load(run_dir / "bundle")  # what `edgekiln predict` and `serve` open: the user sees where it runs
    assert any("on backend 'cpu'" in r.getMessage() for r in caplog.records if r.name == "edgekiln.runtime")


def test_report_says_where_8bit_int8_weights_run():
    from pipeline.report import int8_weights_text

    seven = {"weights": "int8 (7-bit range), per-channel", "activations": "uint8", "weight_bits": 7}
    assert int8_weights_text(seven) == "Weights int8 (7-bit range), per-channel, activations uint8."
    eight = int8_weights_text({"weights": "int8, per-channel", "activations": "uint8", "weight_bits": 8})
    assert eight.startswith("Weights int8, per-channel, activations uint8. 8-bit weights run as certified only on")
    assert "runtime's cpu backend refuses the artifact there" in eight


def test_8bit_int8_weights_on_a_cpu_that_saturates_them_are_neither_checked_nor_shipped_on_cpu(run_copy, monkeypatch,
                                                                                                caplog):
    """export.int8_reduce_range: false on an x86 CPU without VNNI (its flags substituted): the export says
    so before calibrating, the parity gate skips the INT8 artifact on the cpu backend, no INT8-on-cpu
    candidate enters the deploy choice, and the shipped bundle leaves the unchecked artifact out."""
    from runtime.backends import ort as ort_backend

    cfg, run_dir = run_copy
    d = yaml.safe_load(cfg.read_text())
    d["export"] = {"precisions": ["fp32", "int8"], "calibration_size": 20, "int8_reduce_range": False}
    d["deploy"] = {"latency_rounds": 5}
    cfg.write_text(yaml.safe_dump(d))
    monkeypatch.setattr(ort_backend.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(ort_backend, "_cpu_flags", lambda: frozenset({"sse4_1", "avx2"}))
    r = CliRunner().invoke(cli, ["export", str(cfg), "--model", "student"])
    assert r.exit_code == 0, r.output
    assert "int8: 8-bit weights (export.int8_reduce_range: false) on this x86 CPU without VNNI" in caplog.text
    assert "parity: onnx_int8 not checked on this machine: backend 'cpu': model.int8.onnx has 8-bit" in caplog.text
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "onnx_int8" not in metrics["onnx"]["artifacts"]  # skipped on cpu, and the log said why
    assert not [c for c in metrics["deploy"]["candidates"] if c["artifact"] == "onnx_int8" and c["backend"] == "cpu"]
    assert any(c["artifact"] == "onnx" and c["backend"] == "cpu" for c in metrics["deploy"]["candidates"])
    assert set(read_bundle(run_dir / "bundle").manifest.artifacts) == {"onnx"}  # what it could not check does not ship
