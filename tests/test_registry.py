"""Every extension point uses runtime.registry.Registry: a duplicate name raises, an unknown name
raises the extension point's own error listing the valid names."""

from __future__ import annotations

import pytest

from exporters.builders import BUILDERS
from exporters.errors import BuilderError
from exporters.specs import SPECS
from pipeline.models import MODELS
from pipeline.strategies.registry import STRATEGIES
from runtime.backends.base import BACKENDS
from runtime.errors import BackendError, ConfigError, EdgekilnError, ModelError

REGISTRIES = {
    "backend": (BACKENDS, BackendError, "cpu", "unknown backend 'nope'; valid: cpu, cuda, tensorrt, tensorrt-engine, openvino, auto"),
    "strategy": (STRATEGIES, ConfigError, "lora", "adapt.strategy: unknown strategy 'nope'; valid: feature_extraction, "
                                                   "finetune, lora"),
    "model": (MODELS, ModelError, "efficientnet_lite0", "unknown model 'nope'; valid: "),
    "builder": (BUILDERS, BuilderError, "onnx", "unknown artifact builder 'nope'; valid: onnx, onnx_fp16, onnx_int8, "
                                                "tensorrt"),
    "spec": (SPECS, EdgekilnError, "generic", "unknown export spec family 'nope'; valid: compact_cnn, efficientnet_lite, "),
}


@pytest.mark.parametrize("kind", REGISTRIES)
def test_duplicate_names_raise_and_unknown_names_list_the_valid_ones(kind):
    registry, error, taken, message = REGISTRIES[kind]
    with pytest.raises(ValueError, match=f"'{taken}' is already registered"):
        registry.add(taken, registry.get(taken))
    with pytest.raises(error) as e:
        registry.get("nope")
    assert str(e.value).startswith(message)


def test_reserved_names_cannot_be_registered():
    with pytest.raises(ValueError, match="backend 'auto' is already registered"):
        BACKENDS.add("auto", BACKENDS.get("cpu"))
