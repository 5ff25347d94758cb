"""Training throughput on a GPU (issue 7). Prints images/second.

  (a) ResNet-50 full fine-tuning with GPU-resident synthetic input (measures the GPU, not the loader);
  (b) EfficientNet-Lite0 fine-tuning through the real data pipeline (ImageFolder PNGs, DataLoader with
      workers, pinned memory, non_blocking copies), with the share of time spent waiting for data.

Usage (on the GPU machine):
  python bench/gpu_train.py --device cuda --amp bf16 --channels-last [--compile]
  torchrun --nproc_per_node=1 bench/gpu_train.py --device cuda --amp bf16 --ddp   # NCCL path, world size 1
Runs on CPU too (--device cpu, small --batch/--steps) so the script itself is tested without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

import torch
import torch.nn.functional as F
import torchvision


def _amp(device: str, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _train_step(model, opt, scaler, x, y, device: str, amp: str) -> None:
    with _amp(device, amp):
        loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()


def synthetic_resnet50(device: str, batch: int, steps: int, amp: str, channels_last: bool, compile_: bool, ddp: bool) -> float:
    model = torchvision.models.resnet50(num_classes=1000).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[0] if device == "cuda" else None)
    if compile_:
        model = torch.compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(device, enabled=amp == "fp16")
    x = torch.randn(batch, 3, 224, 224, device=device).to(memory_format=fmt)
    y = torch.randint(0, 1000, (batch,), device=device)
    warm = max(3, steps // 5)
    for i in range(warm + steps):
        if i == warm:
            _sync(device)
            t0 = time.perf_counter()
        _train_step(model, opt, scaler, x, y, device, amp)
    _sync(device)
    return batch * steps / (time.perf_counter() - t0)


def real_pipeline_lite0(device: str, batch: int, steps: int, amp: str, channels_last: bool, workers: int) -> tuple[float, float]:
    from pipeline.data import ImageListDataset, demo_data_dir, eval_transform, make_split
    from pipeline.models import create_model

    split = make_split(demo_data_dir(), 0.15, 0.2, 0)
    model = create_model("efficientnet_lite0", 10, "default").to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    spec = model.defaults.preprocess(224, 1.0)
    ds = ImageListDataset(split.paths("train"), split.labels("train"), eval_transform(spec))
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, pin_memory=device == "cuda",
                                         persistent_workers=workers > 0, drop_last=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device, enabled=amp == "fp16")
    seen, wait, done = 0, 0.0, 0
    t_start = None
    while done < steps:
        t_wait = time.perf_counter()
        for xb, yb in loader:
            xb = xb.to(device, non_blocking=True).to(memory_format=fmt)
            yb = yb.to(device, non_blocking=True)
            if t_start is not None:
                wait += time.perf_counter() - t_wait
            _train_step(model, opt, scaler, xb, yb, device, amp)
            _sync(device)
            if t_start is None:  # first step: warm-up (cudnn autotune, worker start)
                t_start = time.perf_counter()
            else:
                seen += len(yb)
                done += 1
            if done >= steps:
                break
            t_wait = time.perf_counter()
    total = time.perf_counter() - t_start
    return seen / total, wait / total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--amp", choices=["none", "bf16", "fp16"], default="bf16")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--ddp", action="store_true", help="wrap in DistributedDataParallel (run under torchrun)")
    ap.add_argument("--only", choices=["a", "b"], default=None)
    args = ap.parse_args()
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.ddp:
        import torch.distributed as dist

        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
        print(f"ddp: backend {dist.get_backend()} world size {dist.get_world_size()}")
    dev_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"device {dev_name}  torch {torch.__version__}  amp {args.amp}  channels_last {args.channels_last}  compile {args.compile}")
    if args.only in (None, "a"):
        ips = synthetic_resnet50(args.device, args.batch, args.steps, args.amp, args.channels_last, args.compile, args.ddp)
        print(f"(a) resnet50 synthetic: {ips:.0f} images/s (batch {args.batch})")
    if args.only in (None, "b"):
        ips, wait = real_pipeline_lite0(args.device, min(args.batch, 128), args.steps, args.amp, args.channels_last, args.workers)
        print(f"(b) efficientnet_lite0 real pipeline: {ips:.0f} images/s, waiting for data {wait:.1%} of the time")
    if args.ddp:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
