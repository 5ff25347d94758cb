"""Issue 5 acceptance figures on the digits demo run: FP32 / FP16 / INT8 ONNX of the
EfficientNet-Lite0 teacher and the MobileNetV3-Small student, each through the
parity gate, then `edgekiln bench` side by side (latencies in alternating blocks, one process).

    python bench/export_acceptance.py /tmp/runs/demo [--workdir /tmp/acc]

The run directory is copied first (it is never modified). Not a test: it prints figures
that bench/RESULTS.md records.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/edgekiln-acceptance"))
    ap.add_argument("--roles", default="teacher,student")
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--threads", default="0,1", help="onnxruntime intra-op threads to bench with (0 = default: all cores)")
    args = ap.parse_args()

    import yaml

    from exporters.bench import bench_bundle, ratios, write_outputs
    from pipeline.config import build_config
    from pipeline.export_stage import run_export

    if args.workdir.exists():
        shutil.rmtree(args.workdir)
    run = args.workdir / args.run_dir.name
    shutil.copytree(args.run_dir, run, ignore=shutil.ignore_patterns("bundle*"))
    raw = yaml.safe_load((run / "config.yaml").read_text())
    raw["runs_dir"] = str(args.workdir)
    raw.setdefault("export", {})["precisions"] = ["fp32", "fp16", "int8"]
    cfg = build_config(raw)
    summary = {}
    for role in args.roles.split(","):
        t0 = time.perf_counter()
        m = run_export(cfg, role=role, out=run / f"bundle-{role}").to_metrics()
        export_s = time.perf_counter() - t0
        print(f"\n== {role} ({m['bundle']}), export {export_s:.0f}s")
        summary[role] = {"export_seconds": export_s, "int8": m.get("int8"), "artifacts": m["artifacts"],
                         "failures": m["failures"], "bench": {}}
        for th in [int(t) for t in args.threads.split(",")]:
            rows = bench_bundle(run / f"bundle-{role}", rounds=args.rounds, threads=th or None)
            q = ratios(rows)
            write_outputs(rows, args.workdir / f"bench-{role}-t{th}", title=f"digits demo, {role}, threads {th or 'all'}")
            summary[role]["bench"][th] = {"rows": [r.__dict__ for r in rows], "ratios": q}
            print(f"-- onnxruntime CPU, intra-op threads: {th or 'default (all cores)'}")
            print(f"{'artifact':10} {'prec':5} {'MB':>6} {'acc':>7} {'agree':>8} {'p50 ms':>7} {'p95 ms':>7} {'img/s':>6} parity")
            for r in rows:
                print(f"{r.artifact:10} {r.precision:5} {r.size_mb:6.2f} {r.accuracy:7.4f} {r.agreement:8.2%} "
                      f"{r.latency_p50_ms:7.2f} {r.latency_p95_ms:7.2f} {r.throughput_ips:6.0f} {r.parity_mark}")
            for k, v in q.items():
                print(f"{k}/onnx: latency p50 {v['latency_p50']:.3f}x, size {v['size']:.3f}x")
        g = m["int8"]["guard"]
        print(f"int8 calibration per class: {m['int8']['calibration']['per_class']}; guard (val): fp32 "
              f"{g['fp32_accuracy']:.4f} int8 {g['int8_accuracy']:.4f}, excluded {g['excluded_nodes']}")
        if m["failures"]:
            print("FAILURES:", m["failures"])
    (args.workdir / "acceptance.json").write_text(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
