"""A Triton Inference Server model repository from a bundle:

    DIR/<model>/config.pbtxt     ModelConfig in protobuf text format
    DIR/<model>/1/model.onnx     (or model.plan for a TensorRT engine, model.xml + model.bin for OpenVINO IR)
    DIR/<model>/labels.txt       one class name per line (label_filename)

Field names follow Triton's model_config.proto
(https://github.com/triton-inference-server/common/blob/main/protobuf/model_config.proto):
with max_batch_size > 0 the batch axis is implicit, so `dims` leave it out.

An OpenVINO IR artifact is served by Triton's OpenVINO backend (`backend: "openvino"`, its parameters:
https://github.com/triton-inference-server/openvino_backend, "Parameters"): PERFORMANCE_HINT, NUM_STREAMS,
and HINT_BF16 for a bf16 artifact. That backend has no f32 hint, so on a CPU with bf16 (AMX,
AVX512-BF16) OpenVINO's own default runs an FP32 IR in bf16: only the bf16 artifact was
parity-checked for that; serve FP32 there with edgekiln's server (`--backend openvino`).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from exporters.errors import TritonError
from runtime.bundle import BundleManifest, read_bundle
from runtime.files import atomic_write_text

PLATFORMS = {"onnx": ("onnxruntime_onnx", "model.onnx"), "tensorrt": ("tensorrt_plan", "model.plan")}
BACKENDS = {"openvino": ("openvino", "model.xml")}  # formats served by a Triton backend rather than a platform


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
    backend: str | None = None,
    parameters: dict[str, str] | None = None,
) -> str:
    """config.pbtxt; `backend` (e.g. "openvino") replaces `platform`, `parameters` are the backend's."""
    preferred = ", ".join(str(b) for b in preferred_batch_sizes)
    engine = f'backend: "{backend}"' if backend else f'platform: "{platform}"'
    params = "".join(f'parameters: {{\n  key: "{k}"\n  value: {{ string_value: "{v}" }}\n}}\n'
                     for k, v in (parameters or {}).items())
    return f"""name: "{name}"
{engine}
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
    kind: {"KIND_CPU" if backend == "openvino" else "KIND_AUTO"}
  }}
]
{params}"""


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
    m = bundle.manifest
    if artifact not in m.artifacts:
        raise TritonError(f"{bundle_dir}: no '{artifact}' artifact to put in a Triton repository "
                          f"(has: {', '.join(m.artifacts)})")
    art = m.artifacts[artifact]
    fmt = art.format
    if fmt not in PLATFORMS and fmt not in BACKENDS:
        raise TritonError(f"artifact '{artifact}' has format '{fmt}'; Triton platforms here: "
                          f"{', '.join([*PLATFORMS, *BACKENDS])}")
    platform, filename = PLATFORMS.get(fmt) or BACKENDS[fmt]
    backend = platform if fmt in BACKENDS else None
    parameters = None
    if backend == "openvino":
        parameters = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}
        if art.precision == "bf16":
            parameters["HINT_BF16"] = "YES"
    name = model_name or _model_name(m)
    preferred = sorted({b for b in (preferred_batch_sizes or [max(1, max_batch_size // 4), max_batch_size])
                        if 1 <= b <= max_batch_size})
    if max_batch_size < 1 or not preferred:
        raise TritonError("triton max_batch_size must be >= 1 and preferred batch sizes within 1..max_batch_size")
    chw = [int(d) for d in m.input.shape[1:]]
    model_dir = Path(repo) / name
    if model_dir.exists():
        shutil.rmtree(model_dir)
    (model_dir / "1").mkdir(parents=True)
    src = bundle.path(artifact)
    shutil.copyfile(src, model_dir / "1" / filename)
    data = src.with_name(src.name + ".data")  # external weights travel with the model file
    if data.exists():
        shutil.copyfile(data, model_dir / "1" / data.name)
    if fmt == "openvino":  # the IR's weights: model.bin next to model.xml
        shutil.copyfile(src.with_suffix(".bin"), model_dir / "1" / Path(filename).with_suffix(".bin").name)
    atomic_write_text(model_dir / "labels.txt", "".join(f"{c}\n" for c in m.class_names))
    atomic_write_text(
        model_dir / "config.pbtxt",
        config_pbtxt(name, platform, m.input.name, chw, m.output.name, len(m.class_names), max_batch_size, preferred,
                     backend=backend, parameters=parameters),
    )
    return model_dir


def _model_name(m: BundleManifest) -> str:
    arch = m.model.arch or "model"
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


def _minimal_model_config_class():
    """The subset of Triton's ModelConfig that edgekiln writes, built as a real protobuf message
    (same field names, types and enum names as model_config.proto), for strict parsing where
    tritonclient is not installed."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="edgekiln_triton_min.proto", package="edgekiln.triton", syntax="proto3")

    def enum(name, values):
        e = fdp.enum_type.add(name=name)
        for i, v in enumerate(values):
            e.value.add(name=v, number=i)

    enum("DataType", ["TYPE_INVALID", "TYPE_BOOL", "TYPE_UINT8", "TYPE_UINT16", "TYPE_UINT32", "TYPE_UINT64",
                      "TYPE_INT8", "TYPE_INT16", "TYPE_INT32", "TYPE_INT64", "TYPE_FP16", "TYPE_FP32", "TYPE_FP64",
                      "TYPE_STRING", "TYPE_BF16"])

    def message(name, fields, enums=()):
        m = fdp.message_type.add(name=name)
        for ename, values in enums:
            e = m.enum_type.add(name=ename)
            for i, v in enumerate(values):
                e.value.add(name=v, number=i)
        for i, (fname, ftype, label, type_name) in enumerate(fields, start=1):
            f = m.field.add(name=fname, number=i, type=ftype, label=label)
            if type_name:
                f.type_name = type_name
        return m

    one, rep = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    message("ModelInput", [("name", F.TYPE_STRING, one, ""), ("data_type", F.TYPE_ENUM, one, ".edgekiln.triton.DataType"),
                           ("format", F.TYPE_ENUM, one, ".edgekiln.triton.ModelInput.Format"),
                           ("dims", F.TYPE_INT64, rep, "")],
            enums=[("Format", ["FORMAT_NONE", "FORMAT_NHWC", "FORMAT_NCHW"])])
    message("ModelOutput", [("name", F.TYPE_STRING, one, ""), ("data_type", F.TYPE_ENUM, one, ".edgekiln.triton.DataType"),
                            ("dims", F.TYPE_INT64, rep, ""), ("label_filename", F.TYPE_STRING, one, "")])
    message("ModelDynamicBatching", [("preferred_batch_size", F.TYPE_INT32, rep, ""),
                                     ("max_queue_delay_microseconds", F.TYPE_UINT64, one, "")])
    message("ModelInstanceGroup", [("count", F.TYPE_INT32, one, ""),
                                   ("kind", F.TYPE_ENUM, one, ".edgekiln.triton.ModelInstanceGroup.Kind")],
            enums=[("Kind", ["KIND_AUTO", "KIND_GPU", "KIND_CPU", "KIND_MODEL"])])
    message("ModelParameter", [("string_value", F.TYPE_STRING, one, "")])
    entry = message("ParametersEntry", [("key", F.TYPE_STRING, one, ""),
                                        ("value", F.TYPE_MESSAGE, one, ".edgekiln.triton.ModelParameter")])
    entry.options.map_entry = True  # `parameters` is map<string, ModelParameter>, as in model_config.proto
    message("ModelConfig", [("name", F.TYPE_STRING, one, ""), ("platform", F.TYPE_STRING, one, ""),
                            ("max_batch_size", F.TYPE_INT32, one, ""),
                            ("input", F.TYPE_MESSAGE, rep, ".edgekiln.triton.ModelInput"),
                            ("output", F.TYPE_MESSAGE, rep, ".edgekiln.triton.ModelOutput"),
                            ("dynamic_batching", F.TYPE_MESSAGE, one, ".edgekiln.triton.ModelDynamicBatching"),
                            ("instance_group", F.TYPE_MESSAGE, rep, ".edgekiln.triton.ModelInstanceGroup"),
                            ("backend", F.TYPE_STRING, one, ""),
                            ("parameters", F.TYPE_MESSAGE, rep, ".edgekiln.triton.ParametersEntry")])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("edgekiln.triton.ModelConfig"))


def parse_config_pbtxt(text: str, minimal: bool = False):
    """Parse config.pbtxt strictly (unknown fields and bad enum values raise) into a ModelConfig
    message: Triton's own (tritonclient) when installed, else edgekiln's minimal one."""
    from google.protobuf import text_format

    cls = None if minimal else model_config_class()
    cls = cls or _minimal_model_config_class()
    try:
        return text_format.Parse(text, cls())
    except text_format.ParseError as e:
        raise TritonError(f"config.pbtxt does not parse as Triton's ModelConfig: {e}") from None
