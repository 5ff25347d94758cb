"""The one end-to-end test on the real EfficientNet-Lite0 ImageNet weights and
the full digits data: the demo pipeline with a shorter student schedule."""

import json

import pytest
from click.testing import CliRunner

from pipeline.cli import cli


@pytest.mark.slow
def test_demo_pipeline_real_weights(tmp_path):
    r = CliRunner().invoke(cli, ["demo", "--runs-dir", str(tmp_path), "--student-epochs", "8"])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert m["teacher"]["model"] == "efficientnet_lite0"
    assert m["teacher"]["test_accuracy"] >= 0.93
    assert m["student"]["test_accuracy"] >= 0.93
    assert m["validate"]["agreement"] == 1.0
    assert m["validate"]["max_abs_logit_diff"] <= 1e-3
    assert "ONNX" in r.output and "100.00%" in r.output
