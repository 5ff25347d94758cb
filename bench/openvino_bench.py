"""OpenVINO vs onnxruntime latency on the CPU, side by side (issue 15): for each bundle, each precision
(FP32, bf16 where the CPU has it, INT8) at batch 1 and batch 16, the OpenVINO/onnxruntime latency ratio.

    python bench/openvino_bench.py runs/x/bundle-teacher runs/x/bundle-student --rounds 4 --out bench/export_results/openvino

Pairs, all opened through runtime.backends.session_for_artifact (the serving code):
    fp32   onnx on cpu            vs  openvino (IR) on openvino, f32 hint
    bf16   onnx on cpu            vs  openvino_bf16 (IR, bf16 hint)          only on a CPU with bf16
    int8   onnx_int8 on cpu (QDQ) vs  openvino_int8 (NNCF) on openvino, f32 hint
           onnx_int8 on cpu       vs  onnx_int8 on openvino (the same QDQ file), f32 hint
Each round times every runner in its own block (exporters.bench.alternating_latency: the machine's
load drifts over all alike); a round's figure is its median, the reported figure the median of rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import numpy as np

from exporters.bench import _inputs, alternating_latency
from runtime.backends import OpenVINOOptions, session_for_artifact
from runtime.backends.openvino import supported_precisions
from runtime.bundle import read_bundle

PAIRS = [  # (precision, onnxruntime artifact, openvino artifact, openvino backend options)
    ("fp32", "onnx", "openvino", None),
    ("bf16", "onnx", "openvino_bf16", None),
    ("int8", "onnx_int8", "openvino_int8", None),
    ("int8 (same QDQ file)", "onnx_int8", "onnx_int8", OpenVINOOptions(precision="f32")),
]


def bench(bundle_dir: Path, batches: tuple[int, ...], rounds: int, per_block: int, threads: int | None) -> list[dict]:
    bundle = read_bundle(bundle_dir)
    arts = bundle.manifest.artifacts
    bf16 = "bf16" in supported_precisions("CPU")
    rows = []
    for precision, ort_key, ov_key, opts in PAIRS:
        if ort_key not in arts or ov_key not in arts or (precision == "bf16" and not bf16):
            continue
        runners = {"onnxruntime": session_for_artifact(bundle, ort_key, backend="cpu", intra_op_threads=threads).run,
                   "openvino": session_for_artifact(bundle, ov_key, backend="openvino", intra_op_threads=threads,
                                                    options=opts).run}
        for batch in batches:
            x = _inputs(bundle, batch)
            med: dict[str, list[float]] = {k: [] for k in runners}
            for _ in range(rounds):  # alternating rounds; each round's median
                t = alternating_latency(runners, x, blocks=1, per_block=per_block, warmup=3)
                for k, v in t.items():
                    med[k].append(float(np.median(v)) * 1e3)
            ort_ms, ov_ms = float(np.median(med["onnxruntime"])), float(np.median(med["openvino"]))
            rows.append({"bundle": bundle.manifest.model.role, "arch": bundle.manifest.model.arch,
                         "precision": precision, "onnxruntime": ort_key, "openvino": ov_key, "batch": batch,
                         "onnxruntime_ms": ort_ms, "openvino_ms": ov_ms, "ratio_ov_over_ort": ov_ms / ort_ms,
                         "rounds_ms": med})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundles", nargs="+", type=Path)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--per-block", type=int, default=20)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    rows = [r for b in a.bundles for r in bench(b, tuple(a.batches), a.rounds, a.per_block, a.threads)]
    print(f"{'bundle':8} {'precision':22} {'batch':>5} {'onnxruntime ms':>15} {'openvino ms':>12} {'ov/ort':>7}")
    for r in rows:
        print(f"{r['bundle']:8} {r['precision']:22} {r['batch']:>5} {r['onnxruntime_ms']:>15.2f} "
              f"{r['openvino_ms']:>12.2f} {r['ratio_ov_over_ort']:>7.2f}")
    if a.out:
        import openvino
        import onnxruntime

        machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                   "openvino": openvino.get_version(), "onnxruntime": onnxruntime.__version__,
                   "openvino_cpu_precisions": supported_precisions("CPU")}
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.with_suffix(".json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
        print(f"wrote {a.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
