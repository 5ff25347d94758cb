"""The artifact-builder registry: every registered builder is known here, names are unique,
and the export settings pick builders the way the bundle names its artifacts."""

import pytest

from exporters.builders import builder_names, get_builder, register_builder, wanted_builders
from exporters.config import ExportConfig
from exporters.errors import BuilderError

# Every registered builder with its file name: a new builder without an entry here fails the first test.
FILES = {"onnx": "model.onnx", "onnx_fp16": "model.fp16.onnx", "onnx_int8": "model.int8.onnx", "tensorrt": "model.plan"}


def test_every_registered_builder_is_known():
    assert builder_names() == list(FILES)
    assert {n: get_builder(n).file for n in builder_names()} == FILES


def test_duplicate_and_unknown_names_raise():
    with pytest.raises(ValueError, match="artifact builder 'onnx' is already registered"):
        register_builder("onnx", "x.onnx", wanted=lambda s: True)(lambda ctx: None)
    with pytest.raises(BuilderError, match="unknown artifact builder 'openvino'; valid: onnx, onnx_fp16"):
        get_builder("openvino")


@pytest.mark.parametrize("settings,names,calibrated", [
    ({}, ["onnx"], False),
    ({"precisions": ["fp16"]}, ["onnx", "onnx_fp16"], False),
    ({"precisions": ["int8"]}, ["onnx", "onnx_int8"], True),
    ({"tensorrt": {"enabled": True}}, ["onnx", "tensorrt"], False),
    ({"tensorrt": {"enabled": True, "precision": "int8"}}, ["onnx", "tensorrt"], True),
])
def test_settings_pick_builders_and_calibration(settings, names, calibrated):
    s = ExportConfig.model_validate(settings)
    picked = wanted_builders(s)
    assert [b.name for b in picked] == names
    assert any(b.needs_calibration(s) for b in picked) is calibrated
