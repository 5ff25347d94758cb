"""`edgekiln bench`, onnxslim's parity guard, and the external-data format."""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from pipeline.cli import cli

from tests.test_export_artifacts import exported  # noqa: F401  (module-scoped export fixture)


def test_bench_prints_table_ratios_and_writes_json_and_png(exported, tmp_path):  # noqa: F811
    _, run_dir, _, _ = exported
    r = CliRunner().invoke(cli, ["bench", str(run_dir / "bundle"), "--rounds", "5", "--out", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    for col in ("format", "precision", "size MB", "accuracy", "top-1 agreement", "p50 ms", "p95 ms", "img/s", "parity"):
        assert col in r.output
    assert "onnx_int8 / onnx (fp32), measured side by side: latency p50" in r.output
    assert "onnx_fp16 / onnx (fp32), measured side by side" in r.output
    data = json.loads((tmp_path / "b.json").read_text())
    rows = {row["artifact"]: row for row in data["rows"] if row["backend"] == "onnxruntime-cpu"}  # each one's gate
    assert set(rows) == {"onnx", "onnx_fp16", "onnx_int8"}
    assert all(row["parity_mark"] == "✅" and row["latency_p50_ms"] > 0 and row["throughput_ips"] > 0
               for row in rows.values())
    assert rows["onnx_int8"]["size_mb"] < rows["onnx"]["size_mb"]
    assert data["ratios"]["onnx_int8"]["size"] == rows["onnx_int8"]["size_mb"] / rows["onnx"]["size_mb"]
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_simplify_is_kept_only_when_outputs_match(exported, tmp_path):  # noqa: F811
    import shutil

    from exporters.onnx_export import simplify_onnx

    _, run_dir, _, _ = exported
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    p = tmp_path / "m.onnx"
    shutil.copyfile(run_dir / "bundle" / "model.onnx", p)
    before = p.read_bytes()
    res = simplify_onnx(p, x, atol=-1.0)  # an impossible tolerance: the simplified graph must be rejected
    assert res["applied"] is False and res["reason"].startswith("parity broke")
    assert p.read_bytes() == before and [f.name for f in tmp_path.iterdir()] == ["m.onnx"]
    res = simplify_onnx(p, x, atol=1e-5)
    assert res["applied"] is True and res["max_abs_diff"] <= 1e-5


def test_large_models_use_external_data(tmp_path, monkeypatch):
    from runtime.backends.ort import open_onnx
    import torch

    from exporters import onnx_export
    from exporters.specs import export_spec_for
    from pipeline.models import create_model

    model = create_model("compact_cnn_w0.5", 3, "none").eval()
    monkeypatch.setattr(onnx_export, "PROTOBUF_LIMIT", 1000)  # pretend the model is over protobuf's 2 GiB
    path = tmp_path / "model.onnx"
    onnx_export.export_onnx(model, 32, path, spec=export_spec_for("compact_cnn_w0.5"))
    assert (tmp_path / "model.onnx.data").stat().st_size > path.stat().st_size
    assert any(t.data_location == onnx.TensorProto.EXTERNAL
               for t in onnx.load(str(path), load_external_data=False).graph.initializer)
    x = torch.randn(2, 3, 32, 32)
    sess = open_onnx(str(path))
    with torch.no_grad():
        np.testing.assert_allclose(sess.run(None, {"input": x.numpy()})[0], model(x).numpy(), atol=1e-4)


def test_in_place_activations_export_out_of_place_and_are_restored(tmp_path):
    """export_onnx traces with every `inplace` flag off (a faster decomposition pass), writes the
    same function, and hands the caller's model back with its flags as they were."""
    import torch
    from torch import nn

    from exporters.errors import ExportError
    from exporters.onnx_export import export_onnx
    from runtime.backends.ort import open_onnx

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Conv2d(4, 4, 3), nn.Hardswish(inplace=True),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2, inplace=True), nn.Linear(4, 3)).eval()
    path = tmp_path / "m.onnx"
    export_onnx(model, 16, path)
    assert [m.inplace for m in model.modules() if hasattr(m, "inplace")] == [True, True, True]
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        np.testing.assert_allclose(open_onnx(str(path)).run(None, {"input": x.numpy()})[0], model(x).numpy(), atol=1e-5)

    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("cannot trace this")

    failing = nn.Sequential(nn.ReLU(inplace=True), Broken())
    with pytest.raises(ExportError, match="ONNX export failed"):
        export_onnx(failing, 16, tmp_path / "bad.onnx")
    assert failing[0].inplace is True
