"""The artifact-builder registry: every registered builder is known here, names are unique,
and the export settings pick builders the way the bundle names its artifacts."""

import pytest

from exporters.builders import builder_names, get_builder, register_builder, wanted_builders
from exporters.config import ExportConfig
from exporters.errors import BuilderError

# Every registered builder with its file name: a new builder without an entry here fails the first test.
FILES = {"onnx": "model.onnx", "onnx_fp16": "model.fp16.onnx", "onnx_int8": "model.int8.onnx", "tensorrt": "model.plan",
         "openvino": "model.xml", "openvino_fp16": "model.fp16.xml", "openvino_bf16": "model.xml",
         "openvino_int8": "model.int8.xml"}


def test_every_registered_builder_is_known():
    assert builder_names() == list(FILES)
    assert {n: get_builder(n).file for n in builder_names()} == FILES


def test_duplicate_and_unknown_names_raise():
    with pytest.raises(ValueError, match="artifact builder 'onnx' is already registered"):
        register_builder("onnx", "x.onnx", wanted=lambda s: True)(lambda ctx: None)
    with pytest.raises(BuilderError, match="unknown artifact builder 'coreml'; valid: onnx, onnx_fp16"):
        get_builder("coreml")


@pytest.mark.parametrize("settings,names,calibrated", [
    ({"precisions": ["fp32"]}, ["onnx"], False),
    ({"precisions": ["fp16"]}, ["onnx", "onnx_fp16"], False),
    ({"precisions": ["int8"]}, ["onnx", "onnx_int8"], True),
    ({"precisions": ["fp32"], "tensorrt": {"enabled": True}}, ["onnx", "tensorrt"], False),
    ({"precisions": ["fp32"], "tensorrt": {"enabled": True, "precision": "int8"}}, ["onnx", "tensorrt"], True),
    ({"precisions": ["fp32"], "openvino": {"precisions": ["fp16", "int8"]}}, ["onnx", "openvino", "openvino_fp16",
                                                                            "openvino_int8"], True),
])
def test_settings_pick_builders_and_calibration(settings, names, calibrated):
    s = ExportConfig.model_validate(settings)
    picked = wanted_builders(s)
    assert [b.name for b in picked] == names
    assert any(b.needs_calibration(s) for b in picked) is calibrated


def test_default_precisions_are_fp32_and_int8_plus_fp16_where_a_gpu_runs_it():
    from exporters.config import gpu_backend_available

    names = [b.name for b in wanted_builders(ExportConfig())]
    assert names == ["onnx", *(["onnx_fp16"] if gpu_backend_available() else []), "onnx_int8"]
