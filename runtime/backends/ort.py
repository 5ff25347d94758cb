"""onnxruntime: the only module in edgekiln that creates an `onnxruntime.InferenceSession`.

Backends `cpu`, `cuda` and `tensorrt` each need one onnxruntime execution provider.
Asking for one by name that this install or machine cannot provide raises
BackendError listing what is available; onnxruntime itself would quietly run on
the CPU when a GPU provider fails to initialise, so every session is checked
after creation to be running on the provider that was asked for.

The `cpu` backend refuses an INT8 artifact with 8-bit weights on an x86 CPU without VNNI, whose
integer kernels saturate them (Int8KernelsSaturate): it would not answer as its parity gate certified.

ONNX files that are not (yet) in a bundle — an export being checked, a
quantization candidate, a distillation student being timed — open through
`open_onnx` (the raw session) or `onnx_runner` (a Session, like a backend's).
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import platform
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from runtime.backends.base import register_backend
from runtime.bundle import Bundle
from runtime.errors import BackendError, BundleError

CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
# onnx_runner's backend name for a session on a bare file, by its first provider
_PROVIDER_BACKEND = {CPU: "cpu", CUDA: "cuda", TRT: "tensorrt"}
OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
log = logging.getLogger("edgekiln.runtime")


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


@functools.cache
def preload_cuda_libraries() -> None:
    """Load the CUDA and cuDNN libraries of NVIDIA's wheels (`edgekiln[gpu]`: onnxruntime-gpu with
    cuda-toolkit and nvidia-cudnn) before the first GPU session, so onnxruntime's CUDA provider
    finds them with only the driver installed: no LD_LIBRARY_PATH, no CUDA base image. onnxruntime's
    documented way (CUDA-ExecutionProvider docs, "Preload DLLs"); it searches nvidia/ in site-packages,
    then the default library paths, and does nothing on a CPU build. A library it cannot load
    surfaces as the session's own error; what it printed is logged here at DEBUG."""
    import onnxruntime as ort

    if not hasattr(ort, "preload_dlls"):  # onnxruntime < 1.21
        return
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # it prints; into the log instead
        try:
            ort.preload_dlls()
        except Exception as e:  # noqa: BLE001 - a broken install shows up again, typed, in _create
            print(e)
    lines = [line for line in printed.getvalue().splitlines() if line.strip()]
    if lines:
        log.debug("onnxruntime.preload_dlls: %s", "; ".join(lines))


class OrtSession:
    """An onnxruntime session as a Session: `run(batch) -> logits`, thread-safe."""

    def __init__(self, ort_session: Any, input_name: str, output_name: str, backend: str, model_file: str = ""):
        self.ort_session = ort_session
        self.input_name = input_name
        self.output_name = output_name
        self.backend = backend
        self.provider = ort_session.get_providers()[0]
        self.model_file = model_file  # the file it runs, for logs

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.ort_session.run([self.output_name], {self.input_name: batch})[0]


class IOBindingSession(OrtSession):
    """CUDA/TensorRT sessions: inputs are copied to the GPU once through an
    OrtValue and the output is bound on the device, so onnxruntime does no
    extra staging copies; one device-to-host copy returns the logits.
    See https://onnxruntime.ai/docs/performance/tune-performance/iobinding.html
    """

    def __init__(self, ort_session: Any, input_name: str, output_name: str, backend: str, device_id: int,
                 device: str = "cuda", model_file: str = ""):
        super().__init__(ort_session, input_name, output_name, backend, model_file)
        self.device_id = device_id
        self.device = device  # "cpu" only in tests, which exercise this path without a GPU

    def run(self, batch: np.ndarray) -> np.ndarray:
        import onnxruntime as ort

        binding = self.ort_session.io_binding()  # one per call: IOBinding objects are not thread-safe
        x = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(batch, dtype=np.float32), self.device, self.device_id)
        binding.bind_ortvalue_input(self.input_name, x)
        binding.bind_output(self.output_name, self.device, self.device_id)
        self.ort_session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]


def _session_options(intra_op_threads: int | None, inter_op_threads: int | None, optimization: str):
    import onnxruntime as ort

    levels = dict(zip(OPTIMIZATION_LEVELS, (ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                                            ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                            ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                            ort.GraphOptimizationLevel.ORT_ENABLE_ALL)))
    if optimization not in levels:
        raise ValueError(f"optimization '{optimization}' is not one of {', '.join(OPTIMIZATION_LEVELS)}")
    opts = ort.SessionOptions()
    if intra_op_threads:  # None or 0: onnxruntime's default (one thread per physical core)
        opts.intra_op_num_threads = int(intra_op_threads)
    if inter_op_threads:
        opts.inter_op_num_threads = int(inter_op_threads)
    opts.graph_optimization_level = levels[optimization]
    return opts


def _provider_name(p: str | tuple[str, dict]) -> str:
    return p if isinstance(p, str) else p[0]


def require_provider(name: str, provider: str) -> None:
    """BackendError naming the available providers when this onnxruntime lacks `provider`."""
    available = available_providers()
    if provider not in available:
        raise BackendError(
            f"backend '{name}' needs onnxruntime's {provider}, which this install lacks "
            f"(available: {', '.join(available)}); "
            + ("install onnxruntime-gpu (pip install 'edgekiln[gpu]') on a machine with an NVIDIA GPU"
               if provider != CPU else "reinstall onnxruntime")
        )


def _create(path: Path, providers: Sequence, opts: Any, label: str) -> Any:
    """The one InferenceSession constructor call, checked to run on the provider asked for first."""
    import onnxruntime as ort

    provider = _provider_name(providers[0])
    if provider != CPU:
        preload_cuda_libraries()
    try:
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=list(providers))
    except Exception as e:  # onnxruntime raises untyped errors for bad models and broken GPU setups
        msg = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        if provider == CPU:
            raise BundleError(f"{path}: onnxruntime cannot load it ({msg})") from None
        raise BackendError(f"{label}: onnxruntime could not create a {provider} session ({msg})") from None
    got = sess.get_providers()
    if not got or got[0] != provider:
        # onnxruntime falls back to the CPU with only a warning when a GPU
        # provider fails to initialise (missing CUDA/cuDNN/TensorRT libraries).
        raise BackendError(
            f"{label}: onnxruntime could not initialise {provider} and fell back to "
            f"{', '.join(got) or 'nothing'}; check the CUDA/cuDNN/TensorRT libraries "
            f"(onnxruntime's log above says which one is missing)"
        )
    return sess


def open_onnx(path: str | os.PathLike, *, providers: Sequence[str | tuple[str, dict]] = (CPU,),
              intra_op_threads: int | None = None, inter_op_threads: int | None = None,
              optimization: str = "all") -> Any:
    """An onnxruntime.InferenceSession on an ONNX file (for files outside a bundle).

    providers: execution providers in priority order (names, or (name, options) pairs); the first
    must be available and must actually start (no silent CPU fallback). Threads None or 0 keep
    onnxruntime's defaults; optimization: graph optimization level, one of OPTIMIZATION_LEVELS.
    """
    if not providers:
        raise ValueError("open_onnx needs at least one execution provider")
    first = _provider_name(providers[0])
    require_provider(_PROVIDER_BACKEND.get(first, first), first)
    opts = _session_options(intra_op_threads, inter_op_threads, optimization)
    return _create(Path(path), providers, opts, f"{Path(path).name} on {first}")


def onnx_runner(path: str | os.PathLike, input_name: str | None = None, output_name: str | None = None,
                **options: Any) -> OrtSession:
    """A Session on an ONNX file outside a bundle (open_onnx's options); names default to the
    model's first input and output."""
    sess = open_onnx(path, **options)
    backend = _PROVIDER_BACKEND.get(sess.get_providers()[0], sess.get_providers()[0])
    return OrtSession(sess, input_name or sess.get_inputs()[0].name, output_name or sess.get_outputs()[0].name,
                      backend, model_file=Path(path).name)


def _bundle_session(name: str, providers: list, bundle: Bundle, artifact: str, intra_op_threads: int | None,
                    io_binding: bool, device_id: int) -> OrtSession:
    require_provider(name, _provider_name(providers[0]))
    path = bundle.path(artifact)  # BundleError when absent or outside the bundle
    sess = _create(path, providers, _session_options(intra_op_threads, None, "all"), f"backend '{name}'")
    if io_binding:
        return IOBindingSession(sess, bundle.input_name, bundle.output_name, name, device_id, model_file=path.name)
    return OrtSession(sess, bundle.input_name, bundle.output_name, name, model_file=path.name)


# x86 instruction sets whose U8 x S8 dot products accumulate in int32 (VPDPBUSD); without one of them
# onnxruntime's kernels use VPMADDUBSW/PMADDUBSW, which add pairs of products in int16 and saturate.
_VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni"})
_X86 = frozenset({"x86_64", "amd64", "i386", "i686", "x86"})


class Int8KernelsSaturate(BackendError):
    """An INT8 artifact with 8-bit weights on an x86 CPU without VNNI: onnxruntime's integer kernels
    would not compute what the parity gate certified."""


@functools.cache
def _cpu_flags() -> frozenset[str] | None:
    # onnxruntime has no query for the CPU features its kernels pick, and numpy's (private) list lacks
    # AVX-VNNI; Linux states them in /proc/cpuinfo, which is all this needs.
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        return None
    return None


def u8s8_saturates(machine: str | None = None, flags: frozenset[str] | None = None) -> bool | None:
    """Whether onnxruntime's U8 x S8 integer kernels saturate on this CPU (or on `machine` with `flags`):
    True on x86 without VNNI, False on VNNI x86 and on other architectures (ARM accumulates in int32),
    None on x86 where the flags cannot be read (outside Linux)."""
    machine = (machine or platform.machine()).lower()
    if machine not in _X86:
        return False
    flags = _cpu_flags() if flags is None else flags
    if flags is None:
        return None
    return not (flags & _VNNI_FLAGS)


def int8_weight_bits(art: Any) -> int | None:
    """7 or 8: the integer range of an onnxruntime-quantized artifact's weights (bundle.json's
    quantization record, which before it held `weight_bits` said "(7-bit range)" in `weights`); None
    for any other artifact."""
    q = art.details.get("quantization") if art.precision == "int8" else None
    if not isinstance(q, dict) or not str(q.get("tool", "")).startswith("onnxruntime"):
        return None
    if q.get("weight_bits") in (7, 8):
        return int(q["weight_bits"])
    return 7 if "7-bit" in str(q.get("weights", "")) else 8


def check_int8_kernels(bundle: Bundle, artifact: str) -> None:
    """Int8KernelsSaturate when `artifact` has 8-bit weights and this CPU's integer kernels saturate them
    (an 8-bit U8 activation x S8 weight pair sum passes int16): its answers would differ from those the
    parity gate measured on the export machine (the digits demo's teacher lost 8-12 points so)."""
    art = bundle.artifact(artifact)
    if int8_weight_bits(art) != 8 or not u8s8_saturates():
        return
    raise Int8KernelsSaturate(
        f"backend 'cpu': {art.file} has 8-bit INT8 weights (export.int8_reduce_range: false), which onnxruntime's "
        f"integer kernels saturate on this x86 CPU without VNNI, so it would not answer as its parity gate "
        f"certified; use its FP32 artifact ('onnx'), the openvino backend, or re-export with "
        f"export.int8_reduce_range: true")


@register_backend("cpu", CPU, "onnxruntime on the CPU")
def _cpu(bundle: Bundle, artifact: str = "onnx", intra_op_threads: int | None = None, device_id: int = 0) -> OrtSession:
    check_int8_kernels(bundle, artifact)
    return _bundle_session("cpu", [CPU], bundle, artifact, intra_op_threads, False, device_id)


def cuda_options(precision: str, device_id: int) -> dict[str, Any]:
    """The CUDA execution provider's options for an artifact of `precision`. FP16 runs with NHWC
    kernels (`prefer_nhwc`): on an H200, EfficientNet-Lite0 FP16 at batch 64 went from 13,093 to
    15,851 images/s with the same logits agreement (bench/RESULTS.md, issue 19); FP32 was not
    measured with it and keeps onnxruntime's default layout."""
    opts: dict[str, Any] = {"device_id": device_id}
    if precision == "fp16":
        opts["prefer_nhwc"] = "1"
    return opts


@register_backend("cuda", CUDA, "onnxruntime-gpu's CUDA execution provider, with IO binding")
def _cuda(bundle: Bundle, artifact: str = "onnx", intra_op_threads: int | None = None, device_id: int = 0) -> OrtSession:
    providers = [(CUDA, cuda_options(bundle.artifact(artifact).precision, device_id)), CPU]
    return _bundle_session("cuda", providers, bundle, artifact, intra_op_threads, True, device_id)


@register_backend("tensorrt", TRT,
                  "onnxruntime-gpu's TensorRT execution provider (engines built from the ONNX file and cached)")
def _tensorrt(bundle: Bundle, artifact: str = "onnx", intra_op_threads: int | None = None,
              device_id: int = 0) -> OrtSession:
    require_provider("tensorrt", TRT)
    # TensorRT builds an engine on first load (seconds to minutes); caching it
    # next to the bundle (or where EDGEKILN_TRT_CACHE says) makes later starts fast.
    cache = Path(os.environ.get("EDGEKILN_TRT_CACHE", bundle.root / ".trt-cache"))
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BackendError(f"backend 'tensorrt': cannot create the engine cache {cache} ({e}); set EDGEKILN_TRT_CACHE") from None
    trt_opts = {
        "device_id": device_id,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache),
    }
    providers = [(TRT, trt_opts), (CUDA, {"device_id": device_id}), CPU]
    return _bundle_session("tensorrt", providers, bundle, artifact, intra_op_threads, True, device_id)
