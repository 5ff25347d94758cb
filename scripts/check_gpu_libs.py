"""Fail when a shared library that onnxruntime-gpu's CUDA provider needs does not resolve here.

Run in the GPU image at build time (Dockerfile.gpu) and again by scripts/container-test.sh:

    python check_gpu_libs.py

onnxruntime-gpu lists CUDAExecutionProvider in get_available_providers() whether or not its
libraries can be loaded, and on a GPU host a missing libcublas makes `--backend auto` serve on
the CPU. This check loads the libraries the way the runtime does (onnxruntime.preload_dlls(),
runtime.backends.ort.preload_cuda_libraries), then asks the dynamic loader (`ldd`) to resolve
every library the CUDA provider links, every library preloaded, cuDNN's sub-libraries (cuDNN
dlopens them at run time) and, when TensorRT is installed, the TensorRT provider and TensorRT's
libraries. Only the driver's libcuda.so.1 may be missing: the NVIDIA Container Toolkit mounts
it from the host. ldd is a fresh process and cannot see what this one dlopened, so it gets the
folders of the preloaded libraries as LD_LIBRARY_PATH: the same files resolve.

Standard library only: it runs in the slim serving image.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import subprocess
import sys
from pathlib import Path

DRIVER = {"libcuda.so.1"}  # from the host, through the NVIDIA Container Toolkit
NOT_FOUND = re.compile(r"^\s*(\S+)\s+=>\s+not found", re.M)


def preloaded() -> tuple[list[Path], list[str]]:
    """onnxruntime.preload_dlls() in this process: the files it loaded (from /proc/self/maps)
    and the lines it printed (it prints a line for each required library it could not load)."""
    import onnxruntime as ort

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        ort.preload_dlls()
    maps = Path("/proc/self/maps").read_text().split("\n")
    files = sorted({Path(line.split()[-1]) for line in maps if "/nvidia/" in line and ".so" in line})
    return files, [line for line in printed.getvalue().splitlines() if line.strip()]


def targets(ort_dir: Path, loaded: list[Path]) -> list[Path]:
    """The libraries to resolve: the CUDA provider, what was preloaded, cuDNN's sub-libraries,
    and the TensorRT provider with TensorRT's libraries when the tensorrt_libs wheel is here."""
    out = [ort_dir / "capi" / "libonnxruntime_providers_cuda.so", *loaded]
    cudnn = [p for p in loaded if p.name.startswith("libcudnn.so")]
    if cudnn:
        out += sorted(cudnn[0].parent.glob("libcudnn_*.so.*"))
    spec = importlib.util.find_spec("tensorrt_libs")
    if spec and spec.submodule_search_locations:
        out.append(ort_dir / "capi" / "libonnxruntime_providers_tensorrt.so")
        for folder in spec.submodule_search_locations:
            out += sorted(Path(folder).glob("libnv*.so*"))
    return list(dict.fromkeys(out))


def unresolved(libs: list[Path], search: list[str]) -> dict[str, list[str]]:
    """soname -> the libraries that need it and that ldd could not resolve (the driver excepted)."""
    env = dict(os.environ, LD_LIBRARY_PATH=":".join(search + [os.environ.get("LD_LIBRARY_PATH", "")]).strip(":"))
    missing: dict[str, list[str]] = {}
    for lib in libs:
        if not lib.is_file():
            missing.setdefault(lib.name, []).append("(file absent)")
            continue
        res = subprocess.run(["ldd", str(lib)], capture_output=True, text=True, env=env)
        for soname in NOT_FOUND.findall(res.stdout):
            if soname not in DRIVER:
                missing.setdefault(soname, []).append(lib.name)
    return missing


def main() -> int:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        print(f"check_gpu_libs: this onnxruntime ({ort.__version__}) has no CUDA provider "
              f"({', '.join(ort.get_available_providers())}); install onnxruntime-gpu", file=sys.stderr)
        return 1
    loaded, printed = preloaded()
    problems = [f"preload_dlls: {line}" for line in printed if "fail" in line.lower()]
    if not any(p.name.startswith("libcudnn.so") for p in loaded):
        problems.append("preload_dlls loaded no libcudnn.so.9 (the CUDA provider dlopens it for convolutions); "
                        "install nvidia-cudnn for this CUDA major version")
    libs = targets(Path(ort.__file__).parent, loaded)
    for soname, needers in sorted(unresolved(libs, sorted({str(p.parent) for p in loaded})).items()):
        problems.append(f"{soname} does not resolve (needed by {', '.join(sorted(set(needers)))})")
    try:
        from onnxruntime.capi.build_and_package_info import cuda_version as cuda
    except ImportError:
        cuda = "?"
    if problems:
        print(f"check_gpu_libs: onnxruntime-gpu {ort.__version__} (CUDA {cuda}) cannot load its CUDA provider here:",
              file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    print(f"check_gpu_libs: onnxruntime-gpu {ort.__version__} (CUDA {cuda}): {len(libs)} libraries resolve "
          f"(preloaded {len(loaded)} from {', '.join(sorted({str(p.parent) for p in loaded}))}); "
          f"only the driver's {', '.join(sorted(DRIVER))} comes from the host")
    return 0


if __name__ == "__main__":
    sys.exit(main())
