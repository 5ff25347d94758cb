"""Every architecture family through the whole pipeline on a small real-photo set, one row each.

    python bench/photo_sets.py /tmp/photosets
    python bench/family_matrix.py /tmp/photosets/textures /tmp/matrix [--size 64] [--only vit,swin]

For each family of pipeline.models (one architecture each, tests/test_families.py's choice at a
small input size): `edgekiln run` with `weights: none`, `adapt.strategy: finetune`, one epoch,
`export.precisions: [fp32, int8]`, no distillation, in its own process (so one family's failure or
memory cannot take the others down), under a time limit. The table reports whether it passed
(or the one line it was refused with), test accuracy of the FP32 artifact, the INT8 artifact's
accuracy delta and parity verdict, INT8/FP32 latency p50 ratio at batch 1 on this CPU (> 1: INT8 is
slower here), sizes, and the export's wall time and peak resident memory (bundle.json's
metrics["export"]). Writes matrix.json and matrix.md into the output folder.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# family -> (architecture, input size): the small sizes of tests/test_families.py (32 px, or the
# family's smallest input: Inception 75, MaxViT 224), so that the whole matrix runs in about an hour
# on two shared cores. Latency ratios at 32 px say how INT8 fares on small maps, not at 224 px.
from tests.test_families import FAMILY_CASES, TIMM_CASES  # noqa: E402  (one table of cases, shared with the tests)

CASES = {
    **FAMILY_CASES,
    "vit": ("torchvision/vit_b_16", 32),  # the ViT users reach for (the tests take the smaller B/32)
    "timm (vit)": TIMM_CASES["timm-vit"],
    "inception @64 (refused)": ("torchvision/inception_v3", 64),
}


def run_case(name: str, size: int, data: Path, out: Path, timeout: int) -> dict:
    cfg = {
        "name": "m", "seed": 0, "runs_dir": str(out / "runs"), "data": {"root": str(data), "batch_size": 16},
        "model": {"name": name, "weights": "none", "input_size": size},
        "adapt": {"strategy": "finetune", "epochs": 1, "lr": 0.001},
        "distill": {"enabled": False},
        "export": {"precisions": ["fp32", "int8"], "calibration_size": 32},
        "deploy": {"latency_rounds": 15, "objective": "accuracy"},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(out / "cfg.yaml")], cwd=ROOT,
                           capture_output=True, text=True, timeout=timeout)
        rc, err = p.returncode, p.stderr
    except subprocess.TimeoutExpired:
        rc, err = None, f"timed out after {timeout} s"
    row = {"arch": name, "size": size, "rc": rc, "seconds": round(time.perf_counter() - t0)}
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    row["traceback"] = "Traceback" in err
    if rc != 0:
        row["status"] = "refused" if errors and not row["traceback"] else "FAILED"
        row["why"] = errors[-1][len("error: "):] if errors else err.strip().splitlines()[-1:] or ["?"]
        return row
    metrics = json.loads((out / "runs" / "m" / "metrics.json").read_text())
    cands = {c["artifact"]: c for c in metrics["deploy"]["candidates"] if c["model"] == "teacher"
             and c["backend"] == "cpu"}
    fp32, int8 = cands.get("onnx"), cands.get("onnx_int8")
    bundle = json.loads((out / "runs" / "m" / "bundle" / "bundle.json").read_text())
    cost = bundle["metrics"].get("export", {})
    q = (bundle["artifacts"].get("onnx_int8") or {}).get("details", {}).get("quantization", {}).get("guard", {})
    row.update(status="passed", accuracy=fp32["accuracy"], size_mb=fp32["size_mb"], fp32_ms=fp32["latency_p50_ms"],
               params=metrics["teacher"]["params"], export_s=cost.get("seconds"), peak_mb=cost.get("peak_rss_mb"),
               peak_step=cost.get("peak_step"))
    if int8:
        row.update(int8_delta=int8["accuracy"] - fp32["accuracy"], int8_mb=int8["size_mb"],
                   int8_ms=int8["latency_p50_ms"], ratio=int8["latency_p50_ms"] / fp32["latency_p50_ms"],
                   int8_parity=int8["passed"], kept_float=len(q.get("excluded_nodes", [])))
    return row


def markdown(rows: list[dict]) -> str:
    head = ("| family | model @ px | result | test acc (fp32) | INT8 Δacc | INT8/FP32 latency | FP32 ms | FP32 MB | "
            "INT8 MB | export s | export peak RSS MB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for family, r in rows:
        if r["status"] != "passed":
            lines.append(f"| {family} | {r['arch']} @ {r['size']} | {r['status']}: {r['why']} | | | | | | | | |")
            continue
        i8 = r.get("ratio")
        lines.append(
            f"| {family} | {r['arch']} @ {r['size']} | passed | {r['accuracy']:.3f} | "
            f"{r.get('int8_delta', float('nan')) * 100:+.1f} pts | {i8:.2f}{' (INT8 slower)' if i8 and i8 > 1 else ''} | "
            f"{r['fp32_ms']:.2f} | {r['size_mb']:.1f} | {r.get('int8_mb', float('nan')):.1f} | {r['export_s']:.0f} | "
            f"{r['peak_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--only", default="", help="comma-separated families")
    ap.add_argument("--timeout", type=int, default=900)
    a = ap.parse_args()
    only = [f for f in a.only.split(",") if f]
    rows = []
    done = a.out / "matrix.json"
    previous = {f: r for f, r in json.loads(done.read_text())} if done.is_file() else {}
    for family, (name, size) in CASES.items():
        if only and family not in only:
            if family in previous:
                rows.append((family, previous[family]))
            continue
        r = run_case(name, size, a.data.resolve(), a.out / family.replace(" ", "_").replace("(", "").replace(")", ""),
                     a.timeout)
        print(family, json.dumps(r), flush=True)
        rows.append((family, r))
        done.write_text(json.dumps(rows, indent=1))
    (a.out / "matrix.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
