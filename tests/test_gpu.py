"""CUDA paths (`pytest -m gpu`). Skipped, with the reason, on machines without a CUDA GPU;
the bench scripts' CPU smoke runs keep the GPU code itself exercised everywhere."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")


@pytest.mark.gpu
@needs_cuda
def test_cuda_training_with_autocast_learns():
    from pipeline.models import create_model

    torch.manual_seed(0)
    model = create_model("compact_cnn_w0.5", 2, "none").cuda().to(memory_format=torch.channels_last)
    x = torch.randn(64, 3, 32, 32, device="cuda").to(memory_format=torch.channels_last)
    y = (x[:, 0].mean((1, 2)) > 0).long()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.gpu
@needs_cuda
def test_onnxruntime_cuda_backend_matches_cpu(tiny_run, tiny_data):
    import onnxruntime as ort

    import runtime

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu (CUDAExecutionProvider) is not installed")
    _, run_dir, _ = tiny_run
    files = sorted(tiny_data.rglob("*.png"))[:8]
    cpu = runtime.load(run_dir / "bundle", backend="cpu").logits(files)
    gpu = runtime.load(run_dir / "bundle", backend="cuda").logits(files)
    assert np.abs(cpu - gpu).max() < 1e-3


def test_gpu_train_bench_runs_on_cpu():
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_train.py"), "--device", "cpu", "--batch", "2", "--steps", "2",
         "--amp", "none", "--workers", "0", "--only", "a"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "(a) resnet50 synthetic:" in r.stdout and "images/s" in r.stdout


def test_training_autocast_dtype_is_bf16_where_the_gpu_has_it():
    from pipeline.training.loop import amp_dtype

    assert amp_dtype(torch.device("cpu")) is None
    assert amp_dtype(torch.device("cuda"), bf16_supported=True) == torch.bfloat16  # no GradScaler, no skipped steps
    assert amp_dtype(torch.device("cuda"), bf16_supported=False) == torch.float16


def test_cuda_fp16_artifacts_run_with_nhwc_kernels():
    from runtime.backends.ort import cuda_options

    assert cuda_options("fp16", 1) == {"device_id": 1, "prefer_nhwc": "1"}
    assert cuda_options("fp32", 0) == {"device_id": 0}
    assert cuda_options("int8", 0) == {"device_id": 0}
