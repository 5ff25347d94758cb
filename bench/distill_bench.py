"""Distillation benchmark on the digits demo (issue 4). Prints ratios measured side by side:

  1. MobileNetV3-Small student vs the EfficientNet-Lite0 teacher: accuracy retained,
     parameter ratio, ONNX size ratio, ONNX Runtime CPU latency ratio at batch 1 and 32.
  2. 10 labeled examples per class: the KD student vs the same student without KD.
  3. One distillation epoch with cached teacher logits vs the teacher running live.

Usage: python bench/distill_bench.py [--runs-dir /tmp/bench-runs] [--epochs 15]
Needs the demo teacher; runs `edgekiln adapt` on the demo config first if it is missing.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from pipeline.config import demo_config
from pipeline.data import load_tensors
from pipeline.distill import KDSettings, build_student, train_student
from pipeline.adapt_stage import run_adapt
from pipeline.distill_stage import run_distill
from pipeline.rundir import load_split
from pipeline.checkpoint import load_checkpoint
from pipeline.training import accuracy, predict_logits


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs-dir", type=Path, default=Path("/tmp/bench-runs"))
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: full,few,cache")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    cfg = demo_config(runs_dir=args.runs_dir, name="distill-bench")
    cfg.distill.epochs = args.epochs
    if not cfg.run.checkpoint("teacher").is_file():
        run_adapt(cfg)

    if "full" not in skip:
        m = run_distill(cfg).to_metrics()
        c = m["onnx_cost"]
        print("\n== 1. MobileNetV3-Small student vs EfficientNet-Lite0 teacher (full digits train split)")
        print(f"accuracy  student {m['test_accuracy']:.4f}  teacher {m['teacher_test_accuracy']:.4f}  retained {m['accuracy_retained']:.3f} (target >= 0.98)")
        print(f"params    ratio {m['params_ratio']:.3f} (target <= 0.5)")
        print(f"onnx size ratio {m['onnx_size_ratio']:.3f}")
        print(f"ORT CPU latency b1  student {c['student']['latency_b1_ms']:.2f} ms  teacher {c['teacher']['latency_b1_ms']:.2f} ms  ratio {m['latency_b1_ratio']:.3f} (target <= 0.5)")
        print(f"ORT CPU latency b32 student {c['student']['latency_b32_ms']:.1f} ms  teacher {c['teacher']['latency_b32_ms']:.1f} ms  ratio {m['latency_b32_ratio']:.3f}")

    split = load_split(cfg.run)
    teacher, meta = load_checkpoint(cfg.run.checkpoint("teacher"))
    spec = meta.preprocess
    x, y = load_tensors(split.paths("train"), split.labels("train"), spec)
    vx, vy = load_tensors(split.paths("val"), split.labels("val"), spec)
    tx, ty = load_tensors(split.paths("test"), split.labels("test"), spec)
    kd = KDSettings(cfg.distill.temperature, cfg.distill.alpha)
    common = dict(lr=cfg.distill.lr, weight_decay=cfg.distill.weight_decay, batch_size=cfg.data.batch_size)

    if "few" not in skip:
        print("\n== 2. 10 labeled examples per class: KD vs no KD (same student, same budget, 3 seeds)")
        for seed in range(3):
            g = torch.Generator().manual_seed(seed)
            idx = torch.cat([torch.nonzero(y == c).flatten()[torch.randperm(int((y == c).sum()), generator=g)[:10]] for c in range(10)])
            res = {}
            for name, k in (("kd", kd), ("no_kd", None)):
                s = build_student("torchvision/mobilenet_v3_small", 10, "none")
                train_student(s, x[idx], y[idx], vx, vy, kd=k, teacher=teacher, epochs=40, seed=seed, desc=name, **common)
                res[name] = accuracy(predict_logits(s, tx), ty)
            print(f"seed {seed}: KD {res['kd']:.4f}  no-KD {res['no_kd']:.4f}  gain {res['kd'] - res['no_kd']:+.4f}")

    if "cache" not in skip:
        print("\n== 3. one distillation epoch: cached teacher logits vs live teacher")
        times, setup = {}, {}
        for cache in (True, False):
            s = build_student("torchvision/mobilenet_v3_small", 10, "none")
            t0 = time.perf_counter()
            r = train_student(s, x, y, vx[:0], vy[:0], kd=kd, teacher=teacher, cache_teacher=cache, epochs=2, seed=0,
                              desc="cached" if cache else "live", **common)
            times[cache] = r.history[-1]["seconds"]  # a steady-state epoch
            setup[cache] = time.perf_counter() - t0 - sum(h["seconds"] for h in r.history)
        print(f"epoch with cached teacher logits {times[True]:.1f} s  with live teacher {times[False]:.1f} s  "
              f"speed-up {times[False] / times[True]:.2f}x (target >= 3x); one-time cache cost {setup[True]:.1f} s")
        # The cache removes the teacher's forward passes and nothing else, so the speed-up is
        # 1 + (teacher forward per epoch) / (student training per epoch): >= 3x needs a teacher
        # forward at least twice as costly as the student's forward + backward + optimizer step.
        print(f"teacher forward per epoch ~{times[False] - times[True]:.1f} s vs student training {times[True]:.1f} s: "
              f"teacher/student = {(times[False] - times[True]) / times[True]:.2f} (3x needs >= 2)")


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
