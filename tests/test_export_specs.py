import pytest

from exporters.specs import ExportSpec, export_spec_for, get_export_spec, list_export_specs, register_export_spec
from pipeline.errors import EdgekilnError

# Every registered family must be named here with an architecture it claims: a new spec
# without an entry makes test_every_registered_spec_is_tested fail.
CLAIMS = {
    "generic": "torchvision/vgg11",
    "efficientnet_lite": "efficientnet_lite0",
    "mobilenet_v3": "torchvision/mobilenet_v3_small",
    "resnet": "torchvision/resnet18",
    "compact_cnn": "compact_cnn_w0.5",
    "transformer": "torchvision/vit_b_16",
}


def test_every_registered_spec_is_tested():
    assert set(list_export_specs()) == set(CLAIMS)


@pytest.mark.parametrize("family,arch", sorted(CLAIMS.items()))
def test_spec_resolution_and_declared_contract(family, arch):
    spec = export_spec_for(arch)
    assert spec.family == family
    assert spec.opset >= 17 and spec.min_opset >= 17
    assert spec.input_names == ("input",) and spec.output_names == ("logits",)
    # Batch dynamic, H x W fixed: only axis 0 is named.
    assert spec.dynamic_axes == {"input": {0: "batch"}, "logits": {0: "batch"}}
    assert set(spec.tolerances) == {"fp32", "fp16", "int8", "bf16"}
    assert spec.tolerances["fp32"].min_agreement == 1.0 and spec.tolerances["fp32"].max_abs_logit_diff == 1e-3
    assert spec.tolerances["fp16"].min_agreement == 0.995
    assert spec.tolerances["int8"].max_accuracy_drop == 0.01
    assert spec.tolerances["bf16"].min_agreement == 0.99 and spec.tolerances["bf16"].max_accuracy_drop == 0.01


def test_duplicate_family_and_low_opset_raise():
    class Dup(ExportSpec):
        family = "resnet"

    with pytest.raises(ValueError, match="already registered"):
        register_export_spec(Dup)

    class Old(ExportSpec):
        family = "old-opset"
        opset = 13

    with pytest.raises(ValueError, match="opset 13 < minimum 17"):
        register_export_spec(Old)
    assert "old-opset" not in list_export_specs()


def test_unknown_family_lists_valid_ones():
    with pytest.raises(EdgekilnError, match="unknown export spec family 'nope'; valid: compact_cnn, efficientnet_lite"):
        get_export_spec("nope")


def test_thresholds_resolve_config_over_spec():
    from exporters.thresholds import resolve_thresholds
    from pipeline.config import ValidateConfig

    spec = export_spec_for("efficientnet_lite0")
    v = ValidateConfig()
    assert resolve_thresholds(v, "fp32", spec).max_abs_logit_diff == 1e-3
    assert resolve_thresholds(v, "fp16", spec).min_agreement == 0.995
    assert resolve_thresholds(v, "int8", spec).max_accuracy_drop == 0.01
    v = ValidateConfig.model_validate({"int8": {"max_accuracy_drop": 0.02}, "fp16": {"min_agreement": 0.9}})
    assert resolve_thresholds(v, "int8", spec).max_accuracy_drop == 0.02
    assert resolve_thresholds(v, "fp16", spec).min_agreement == 0.9


def test_export_config_always_writes_fp32_and_rejects_unknown_precision():
    from pipeline.config import ExportConfig, PipelineConfig
    from pipeline.errors import ConfigError

    assert ExportConfig(precisions=["int8"]).precisions == ["fp32", "int8"]
    from pipeline.config import build_config

    with pytest.raises(ConfigError, match="export.precisions.0"):
        build_config({"data": {"demo": True}, "export": {"precisions": ["int4"]}})
    with pytest.raises(ConfigError, match="min_batch <= opt_batch <= max_batch"):
        build_config({"data": {"demo": True}, "export": {"tensorrt": {"opt_batch": 64}}})
    from exporters.config import gpu_backend_available, resolved_precisions

    default = PipelineConfig.model_validate({"data": {"demo": True}}).export
    assert default.precisions is None  # fp32 + int8 (+ fp16 where a GPU backend runs)
    assert resolved_precisions(default) == ["fp32", "int8"] + (["fp16"] if gpu_backend_available() else [])
    assert resolved_precisions(ExportConfig(precisions=["fp16"])) == ["fp32", "fp16"]
