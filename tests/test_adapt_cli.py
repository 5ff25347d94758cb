"""`edgekiln efficiency` and `edgekiln advise` on tiny data."""

import json

import yaml
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.efficiency import few_shot_indices
from tests.conftest import tiny_config_dict


def test_few_shot_indices_are_per_class_and_seeded():
    labels = [0] * 10 + [1] * 3 + [2] * 7
    idx = few_shot_indices(labels, 5, seed=0)
    assert [sum(labels[i] == c for i in idx) for c in range(3)] == [5, 3, 5]
    assert idx == few_shot_indices(labels, 5, seed=0) != few_shot_indices(labels, 5, seed=1)
    assert few_shot_indices(labels, None, 0) == list(range(20))


def test_efficiency_table_plot_and_report(tiny_data, tmp_path):
    d = tiny_config_dict(tiny_data, tmp_path / "runs")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(d))
    args = ["efficiency", str(cfg), "--shots", "2,all", "--strategies", "feature_extraction", "--epochs", "1", "--min-steps", "2"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert "test accuracy vs labeled examples per class" in r.output
    assert any(line.startswith("│ feature_extraction") for line in lines) and any(line.startswith("│ scratch") for line in lines)
    run = tmp_path / "runs" / "tiny"
    res = json.loads((run / "efficiency.json").read_text())
    assert res["shots"] == ["2", "all"] and set(res["accuracy"]) == {"feature_extraction", "scratch"}
    assert all(0 <= a <= 1 for row in res["accuracy"].values() for a in row.values())
    assert (run / "efficiency.png").read_bytes()[:4] == b"\x89PNG"
    report = (run / "report.md").read_text()
    assert "## Data efficiency (test accuracy)" in report and "| method \\ examples per class | 2 | all |" in report

    r = CliRunner().invoke(cli, ["efficiency", str(cfg), "--shots", "2,x"])
    assert r.exit_code == 2 and "'x' is not a positive number or 'all'" in r.output
    r = CliRunner().invoke(cli, ["efficiency", str(cfg), "--strategies", "distill"])
    assert r.exit_code == 2 and r.output == "error: unknown strategy 'distill'; valid: feature_extraction, finetune, lora\n"


def test_advise_reports_data_probe_and_a_reasoned_recommendation(tiny_data):
    r = CliRunner().invoke(cli, ["advise", str(tiny_data), "--input-size", "32"])
    assert r.exit_code == 0, r.output
    out = r.output.splitlines()
    assert out[0] == "data: 45 images, 3 classes, 15-15 per class (imbalance 1.0x)"
    assert out[1] == "image sizes: width 8/8/8, height 8/8/8 (min/median/max); modes L: 45"
    assert out[2].startswith("linear probe (efficientnet_lite0, input 32): validation accuracy ")
    # 10 training images per class and a strong probe: small data, similar domain
    assert out[3] == "recommendation: feature_extraction"
    assert out[4] == "  - 10 training images per class (small)"
    r = CliRunner().invoke(cli, ["advise", str(tiny_data), "--input-size", "32", "--json"])
    a = json.loads(r.output)
    assert a["recommendation"] == "feature_extraction" and a["stats"]["classes"] == 3


def test_advise_on_imbalanced_classes_points_to_data_balance(tmp_path):
    from tests.conftest import write_tiny_folder

    data = write_tiny_folder(tmp_path / "imb", per_class=30)
    for f in sorted((data / "digit2").iterdir())[8:]:  # 30 / 30 / 8
        f.unlink()
    r = CliRunner().invoke(cli, ["advise", str(data), "--input-size", "32", "--json"])
    assert r.exit_code == 0, r.output
    a = json.loads(r.output)
    assert a["stats"]["imbalance"] == 3.75
    assert any(n.startswith("classes are imbalanced (3.8x between the largest and smallest): watch macro-F1")
               and "--set data.balance=weights" in n for n in a["notes"]), a["notes"]


def test_recommendation_rules():
    from pipeline.advise import recommend

    assert recommend(30, 0.9, 5, 4_000_000, False)[0] == "feature_extraction"
    assert recommend(500, 0.97, 5, 4_000_000, False)[0] == "feature_extraction"
    assert recommend(500, 0.9, 5, 4_000_000, False)[0] == "finetune"  # enough data, room to improve
    assert recommend(30, 0.5, 5, 4_000_000, False)[0] == "finetune"  # distant domain
    assert recommend(30, 0.5, 5, 4_000_000, True)[0] == "lora"  # tight budget
    s, reasons = recommend(500, 0.6, 5, 80_000_000, False)
    assert s == "lora" and "a large model (80M parameters)" in reasons[-1]


def test_advise_missing_folder_exits_cleanly(tmp_path):
    r = CliRunner().invoke(cli, ["advise", str(tmp_path / "nope")])
    assert r.exit_code == 1 and r.output == f"error: data.root: directory not found: {tmp_path / 'nope'}\n"


def test_adapt_with_balance_weights_saves_and_reports_the_shifted_head(tiny_data, tmp_path):
    """data.balance weights on a 15:8 folder: the teacher's metrics and report say the head was shifted
    towards the rare class, and the val accuracy before the shift is kept beside the one after."""
    import shutil

    data = tmp_path / "imb"
    shutil.copytree(tiny_data, data)
    for f in sorted((data / "digit2").iterdir())[8:]:  # 15 / 15 / 8
        f.unlink()
    d = tiny_config_dict(data, tmp_path / "runs")
    d["adapt"] = {"epochs": 3, "lr": 0.01}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(d))
    r = CliRunner().invoke(cli, ["adapt", str(cfg), "--set", "data.balance=weights"])
    assert r.exit_code == 0, r.output
    run = tmp_path / "runs" / "tiny"
    t = json.loads((run / "metrics.json").read_text())["teacher"]
    assert t["prior_shift"]["tau"] == 0.25 and 0 <= t["prior_shift"]["val_accuracy_before"] <= 1
    assert "| head shifted towards rare classes (data.balance) | -0.25 · log(class share); val accuracy" in \
        (run / "report.md").read_text()
