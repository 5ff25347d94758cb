"""The exporters' errors, on the shared base in runtime.errors (exporters never import pipeline).

Every one is an EdgekilnError: the CLI prints its message on one line and exits 1.
"""

from runtime.errors import EdgekilnError, ParityError  # noqa: F401  (ParityError: the parity gate's)


class ExportError(EdgekilnError):
    """A model could not be exported or converted (ONNX export, FP16 conversion)."""


class QuantizationError(EdgekilnError):
    """INT8 quantization was asked for something it cannot do (no calibration images, bad method)."""


class TensorRTUnavailable(EdgekilnError):
    """tensorrt (or a CUDA GPU) is missing on this machine."""


class TensorRTBuildError(EdgekilnError):
    """TensorRT rejected the model or could not build an engine from it."""


class TritonError(EdgekilnError):
    """A Triton model repository cannot be written from this bundle with these options."""


class BuilderError(EdgekilnError):
    """An artifact builder name is unknown."""
