"""The Triton model repository written by `edgekiln export --triton-repo`: config.pbtxt
parsed strictly as Triton's ModelConfig protobuf, and the model loads in onnxruntime."""

import numpy as np
import pytest

from exporters.triton import TritonError, model_config_class, parse_config_pbtxt, write_triton_repo
from runtime.bundle import read_bundle

from tests.test_export_artifacts import exported  # noqa: F401  (module-scoped export fixture)

# Triton's own ModelConfig (tritonclient's generated proto) where installed, and edgekiln's
# minimal copy of its schema everywhere, so the strict check always runs.
PROTOS = [
    pytest.param(False, id="tritonclient-proto", marks=pytest.mark.skipif(
        model_config_class() is None, reason="Triton's own ModelConfig proto needs tritonclient (pip install tritonclient)")),
    pytest.param(True, id="minimal-proto"),
]


@pytest.mark.parametrize("minimal", PROTOS)
def test_config_pbtxt_is_a_valid_model_config(exported, minimal):  # noqa: F811
    _, run_dir, repo, output = exported
    m = read_bundle(run_dir / "bundle").manifest
    model_dir = repo / "compact_cnn_w0.5"
    assert f"triton model: {model_dir}" in output
    assert sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file()) == [
        "1/model.onnx", "config.pbtxt", "labels.txt"]
    cfg = parse_config_pbtxt((model_dir / "config.pbtxt").read_text(), minimal=minimal)
    assert cfg.name == "compact_cnn_w0.5" and cfg.platform == "onnxruntime_onnx"
    assert cfg.max_batch_size == 32
    assert list(cfg.dynamic_batching.preferred_batch_size) == [8, 32]
    (inp,), (out,) = cfg.input, cfg.output
    type_name = type(cfg).DESCRIPTOR.fields_by_name["input"].message_type.fields_by_name["data_type"].enum_type
    assert inp.name == "input" and type_name.values_by_number[inp.data_type].name == "TYPE_FP32"
    assert list(inp.dims) == [3, 32, 32]  # no batch axis: max_batch_size > 0 makes it implicit
    assert out.name == "logits" and list(out.dims) == [len(m.class_names)]
    assert out.label_filename == "labels.txt"
    assert (model_dir / "labels.txt").read_text().splitlines() == m.class_names


def test_triton_model_loads_in_onnxruntime_with_the_declared_dims(exported):  # noqa: F811
    from runtime.backends.ort import open_onnx

    _, _, repo, _ = exported
    sess = open_onnx(str(repo / "compact_cnn_w0.5" / "1" / "model.onnx"))
    x = np.zeros((5, 3, 32, 32), dtype=np.float32)  # a dynamic batch, as Triton's batcher sends
    (y,) = sess.run(["logits"], {"input": x})
    assert y.shape == (5, 3)


@pytest.mark.parametrize("minimal", PROTOS)
def test_strict_parser_rejects_unknown_fields_and_bad_enums(minimal):
    with pytest.raises(TritonError, match="does not parse as Triton's ModelConfig.*max_batch_sise"):
        parse_config_pbtxt('name: "m"\nplatform: "onnxruntime_onnx"\nmax_batch_sise: 8\n', minimal=minimal)
    with pytest.raises(TritonError, match="TYPE_FLOAT99"):
        parse_config_pbtxt('name: "m"\ninput [ { name: "x" data_type: TYPE_FLOAT99 dims: [ 3 ] } ]\n', minimal=minimal)


def test_triton_repo_options_are_checked(exported, tmp_path):  # noqa: F811
    _, run_dir, _, _ = exported
    with pytest.raises(TritonError, match="no 'tensorrt' artifact"):
        write_triton_repo(run_dir / "bundle", tmp_path, artifact="tensorrt")
    d = write_triton_repo(run_dir / "bundle", tmp_path, model_name="digits", artifact="onnx_int8", max_batch_size=4,
                          preferred_batch_sizes=[2, 4, 64])
    text = (d / "config.pbtxt").read_text()
    assert 'name: "digits"' in text and "max_batch_size: 4" in text and "preferred_batch_size: [ 2, 4 ]" in text
