"""GPU inference (issue 7): onnxruntime-gpu (CUDA execution provider, IO binding) FP32 and FP16
vs PyTorch eager FP32 and autocast FP16, side by side on the same GPU, for the EfficientNet-Lite0
teacher; and FP16 parity against FP32 PyTorch on the digits demo test split.

Usage: python bench/gpu_infer.py --run-dir runs/demo [--size 224] [--device cuda]
(--device cpu runs the same code on CPU with the CPU provider, without IO binding.)
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _time(fn, n: int) -> list[float]:
    for _ in range(max(3, n // 10)):
        fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return ts


def torch_runner(model, x, device: str, fp16: bool, channels_last: bool = False):
    if channels_last:
        model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)

    def run():
        with torch.inference_mode(), torch.autocast(device, dtype=torch.float16, enabled=fp16):
            model(x)
        if device == "cuda":
            torch.cuda.synchronize()

    return run


def ort_runner(path: Path, x: np.ndarray, device: str, options: dict | None = None):
    """onnxruntime on `device`; on CUDA with IO binding and the CUDA EP's provider `options`
    (prefer_nhwc, enable_cuda_graph: see onnxruntime's CUDA execution provider docs)."""
    import onnxruntime as ort

    options = options or {}
    providers = [("CUDAExecutionProvider", options)] if device == "cuda" else ["CPUExecutionProvider"]
    if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise SystemExit(f"onnxruntime-gpu's CUDAExecutionProvider is missing (have {ort.get_available_providers()})")
    from runtime.backends.ort import open_onnx

    sess = open_onnx(path, providers=providers)
    name, out = sess.get_inputs()[0].name, sess.get_outputs()[0].name
    if device != "cuda":
        return lambda: sess.run([out], {name: x})
    # IO binding: the input lives on the GPU once; outputs stay on the GPU (no host copies timed).
    xo = ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)
    binding = sess.io_binding()
    binding.bind_ortvalue_input(name, xo)
    if options.get("enable_cuda_graph") == "1":  # a captured graph replays into fixed output addresses
        n_out = sess.get_outputs()[0].shape[-1]
        binding.bind_ortvalue_output(out, ort.OrtValue.ortvalue_from_shape_and_type((len(x), n_out), np.float32, "cuda", 0))
    else:
        binding.bind_output(out, "cuda")

    def run():
        sess.run_with_iobinding(binding)

    return run, sess, binding


def main() -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16
    import onnx

    from exporters.onnx_export import export_onnx
    from pipeline.checkpoint import load_checkpoint

    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", type=Path, default=Path("runs/demo"))
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iters", type=int, default=200)
    args = ap.parse_args()
    dev = args.device
    model, meta = load_checkpoint(args.run_dir / "checkpoints" / "teacher.safetensors")
    model = model.to(dev).eval()
    tmp = Path(tempfile.mkdtemp())
    fp32 = tmp / "fp32.onnx"
    export_onnx(model.cpu(), args.size, fp32)
    model = model.to(dev)
    fp16 = tmp / "fp16.onnx"
    onnx.save(convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True), str(fp16))
    print(f"device {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}  torch {torch.__version__}")
    rows = []
    for b, n in ((1, args.iters), (64, max(10, args.iters // 10))):
        x = torch.randn(b, 3, args.size, args.size, device=dev)
        xn = x.cpu().numpy()
        variants = [
            ("pytorch eager fp32", lambda: torch_runner(model, x, dev, False)),
            ("pytorch eager autocast fp16", lambda: torch_runner(model, x, dev, dev == "cuda")),
            ("onnxruntime fp32", lambda: ort_runner(fp32, xn, dev)),
            ("onnxruntime fp16", lambda: ort_runner(fp16, xn, dev)),
        ]
        if dev == "cuda":
            variants += [
                ("pytorch autocast fp16 channels_last", lambda: torch_runner(model, x, dev, True, channels_last=True)),
                ("onnxruntime fp16 prefer_nhwc", lambda: ort_runner(fp16, xn, dev, {"prefer_nhwc": "1"})),
                ("onnxruntime fp16 nhwc+cuda_graph",
                 lambda: ort_runner(fp16, xn, dev, {"prefer_nhwc": "1", "enable_cuda_graph": "1"})),
                ("onnxruntime fp32 cuda_graph", lambda: ort_runner(fp32, xn, dev, {"enable_cuda_graph": "1"})),
            ]
        for name, make in variants:
            try:
                fn = make()
                fn = fn[0] if isinstance(fn, tuple) else fn
                ts = _time(fn, n)
            except Exception as e:  # a provider option this build lacks: report it, time the rest
                print(f"{name} at batch {b}: failed: {str(e).splitlines()[0][:200]}")
                continue
            rows.append((name, b, 1e3 * float(np.median(ts)), b / float(np.median(ts))))
    print(f"{'backend':38s} {'batch':>5s} {'p50 ms':>8s} {'img/s':>9s}")
    for r in rows:
        print(f"{r[0]:38s} {r[1]:5d} {r[2]:8.2f} {r[3]:9.0f}")
    thr = {(r[0], r[1]): r[3] for r in rows}
    for name in [r[0] for r in rows if r[0].startswith("onnxruntime fp16") and r[1] == 64]:
        print(f"ratio {name} / pytorch autocast fp16 at batch 64: "
              f"{thr[(name, 64)] / thr[('pytorch eager autocast fp16', 64)]:.2f}x (target >= 1.5x)")

    # FP16 parity on the demo test split, through the bundle's preprocessing.
    from exporters.parity import Thresholds, compare_logits
    from pipeline.data import Split, load_tensors

    split = Split.load(args.run_dir / "split.json")
    xt, yt = load_tensors(split.paths("test"), split.labels("test"), meta.preprocess)
    fp16_demo = tmp / "fp16_demo.onnx"
    export_onnx(model.cpu(), meta.preprocess.crop, tmp / "fp32_demo.onnx")
    onnx.save(convert_float_to_float16(onnx.load(str(tmp / "fp32_demo.onnx")), keep_io_types=True), str(fp16_demo))
    with torch.inference_mode():
        ref = model.cpu()(xt).numpy()
    providers = ["CUDAExecutionProvider"] if dev == "cuda" else ["CPUExecutionProvider"]
    from runtime.backends.ort import onnx_runner

    cand = onnx_runner(fp16_demo, providers=providers).run(xt.numpy())
    rep = compare_logits("fp16.onnx", ref, cand, yt.numpy(), Thresholds(min_agreement=0.995, max_abs_logit_diff=None))
    if dev == "cuda":
        nhwc = onnx_runner(fp16_demo, providers=[("CUDAExecutionProvider", {"prefer_nhwc": "1"})]).run(xt.numpy())
        r2 = compare_logits("fp16.onnx", ref, nhwc, yt.numpy(), Thresholds(min_agreement=0.995, max_abs_logit_diff=None))
        print(f"fp16 prefer_nhwc parity: agreement {r2.agreement:.4f}, max |Δlogit| {r2.max_abs_logit_diff:.3g}")
    print(f"fp16 parity on {rep.n_images} test images: agreement {rep.agreement:.4f} (target >= 0.995), "
          f"accuracy {rep.artifact_accuracy:.4f} vs {rep.reference_accuracy:.4f}, max |Δlogit| {rep.max_abs_logit_diff:.3g}")


if __name__ == "__main__":
    main()
