"""A Triton Inference Server model repository from a bundle:

    DIR/<model>/config.pbtxt     ModelConfig in protobuf text format
    DIR/<model>/1/model.onnx     (or model.plan for a TensorRT engine)
    DIR/<model>/labels.txt       one class name per line (label_filename)

Field names follow Triton's model_config.proto
(https://github.com/triton-inference-server/common/blob/main/protobuf/model_config.proto):
with max_batch_size > 0 the batch axis is implicit, so `dims` leave it out.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from pipeline.errors import EdgekilnError
from runtime.bundle import atomic_write_text, read_bundle

PLATFORMS = {"onnx": ("onnxruntime_onnx", "model.onnx"), "tensorrt": ("tensorrt_plan", "model.plan")}


class TritonError(EdgekilnError):
    pass


def _dims(shape: list) -> str:
    return "[ " + ", ".join(str(int(d)) for d in shape) + " ]"


def config_pbtxt(
    name: str,
    platform: str,
    input_name: str,
    input_chw: list[int],
    output_name: str,
    num_classes: int,
    max_batch_size: int,
    preferred_batch_sizes: list[int],
    max_queue_delay_us: int = 100,
    label_filename: str = "labels.txt",
) -> str:
    preferred = ", ".join(str(b) for b in preferred_batch_sizes)
    return f"""name: "{name}"
platform: "{platform}"
max_batch_size: {max_batch_size}
input [
  {{
    name: "{input_name}"
    data_type: TYPE_FP32
    format: FORMAT_NCHW
    dims: {_dims(input_chw)}
  }}
]
output [
  {{
    name: "{output_name}"
    data_type: TYPE_FP32
    dims: {_dims([num_classes])}
    label_filename: "{label_filename}"
  }}
]
dynamic_batching {{
  preferred_batch_size: [ {preferred} ]
  max_queue_delay_microseconds: {max_queue_delay_us}
}}
instance_group [
  {{
    count: 1
    kind: KIND_AUTO
  }}
]
"""


def write_triton_repo(
    bundle_dir: Path,
    repo: Path,
    model_name: str | None = None,
    artifact: str = "onnx",
    max_batch_size: int = 32,
    preferred_batch_sizes: list[int] | None = None,
) -> Path:
    """Write (or replace) one model of a Triton repository from a verified bundle; return its directory."""
    bundle = read_bundle(bundle_dir, verify=True)
    meta = bundle.meta
    arts = meta["artifacts"]
    if artifact not in arts:
        raise TritonError(f"{bundle_dir}: no '{artifact}' artifact to put in a Triton repository (has: {', '.join(arts)})")
    fmt = arts[artifact]["format"]
    if fmt not in PLATFORMS:
        raise TritonError(f"artifact '{artifact}' has format '{fmt}'; Triton platforms here: {', '.join(PLATFORMS)}")
    platform, filename = PLATFORMS[fmt]
    name = model_name or _model_name(meta)
    preferred = sorted({b for b in (preferred_batch_sizes or [max(1, max_batch_size // 4), max_batch_size])
                        if 1 <= b <= max_batch_size})
    if max_batch_size < 1 or not preferred:
        raise TritonError("triton max_batch_size must be >= 1 and preferred batch sizes within 1..max_batch_size")
    chw = [int(d) for d in meta["input"]["shape"][1:]]
    model_dir = Path(repo) / name
    if model_dir.exists():
        shutil.rmtree(model_dir)
    (model_dir / "1").mkdir(parents=True)
    src = bundle.path(artifact)
    shutil.copyfile(src, model_dir / "1" / filename)
    data = src.with_name(src.name + ".data")  # external weights travel with the model file
    if data.exists():
        shutil.copyfile(data, model_dir / "1" / data.name)
    atomic_write_text(model_dir / "labels.txt", "".join(f"{c}\n" for c in meta["class_names"]))
    atomic_write_text(
        model_dir / "config.pbtxt",
        config_pbtxt(name, platform, meta["input"]["name"], chw, meta["output"]["name"], len(meta["class_names"]),
                     max_batch_size, preferred),
    )
    return model_dir


def _model_name(meta: dict[str, Any]) -> str:
    arch = meta.get("model", {}).get("arch", "model")
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", arch.split("/")[-1]) or "model"


# --------------------------------------------------------------------------- strict parsing


def model_config_class():
    """Triton's ModelConfig protobuf message class, from tritonclient's generated module when installed
    (imported by file, since `tritonclient.grpc` itself needs grpc), else None."""
    import importlib.util

    try:
        import tritonclient
    except ImportError:
        return None
    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    if not path.is_file():
        return None
    try:
        import google.protobuf  # noqa: F401

        spec = importlib.util.spec_from_file_location("edgekiln_triton_model_config_pb2", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod.ModelConfig
    except Exception:  # generated code for another protobuf major version
        return None


def parse_config_pbtxt(text: str):
    """Parse config.pbtxt strictly (unknown fields and bad enum values raise) into a ModelConfig message."""
    from google.protobuf import text_format

    cls = model_config_class()
    if cls is None:
        raise TritonError("strict config.pbtxt parsing needs tritonclient (pip install tritonclient)")
    try:
        return text_format.Parse(text, cls())
    except text_format.ParseError as e:
        raise TritonError(f"config.pbtxt does not parse as Triton's ModelConfig: {e}") from None
