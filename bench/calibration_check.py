"""Is the issue's "ECE reduced by >= 50 % after temperature scaling" measurable on a run's test split?

    PYTHONPATH=. python bench/calibration_check.py /tmp/runs/demo [--json out.json]

For the teacher and the student checkpoint (PyTorch logits of the validation and test splits, eval
transform), every calibration map is fitted on the validation split only and judged on test:

    raw            softmax(logits)
    temp_nll       one temperature minimising the val NLL (what export fits: exporters.trust)
    vector_nll     per-class scale and bias minimising the val NLL (exporters.trust.fit_vector, l2 0.01)
    temp_ece       one temperature minimising the val 15-bin ECE (grid in log T) - the alternative criterion

Per map, on test: the 15-bin equal-width ECE of the report, an equal-mass 15-bin ECE, the debiased L2
calibration error of Kumar et al. 2019 (https://arxiv.org/abs/1909.10155: per bin the squared gap minus
its sampling variance acc(1-acc)/(n-1); reported as the root, 0 when the estimate is negative), NLL,
a 95 % bootstrap interval of the 15-bin ECE and of its reduction against raw (paired: the same
resampled images for both), and the sampling floor (the ECE a perfectly calibrated model with these
confidences shows on this many images, exporters.trust.ece_floor).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from exporters.trust import _bins, _ece, ece_floor, fit_temperature, fit_vector, nll
from pipeline.checkpoint import load_checkpoint
from pipeline.data import Split
from pipeline.export_stage import pytorch_reference
from runtime.trust import softmax

BINS = 15


def ece(probs: np.ndarray, y: np.ndarray) -> float:
    return _ece(_bins(probs.max(1), probs.argmax(1) == y, BINS))


def ece_equal_mass(probs: np.ndarray, y: np.ndarray) -> float:
    conf, right = probs.max(1), (probs.argmax(1) == y).astype(float)
    order = np.argsort(conf, kind="mergesort")
    return float(sum(len(b) * abs(right[b].mean() - conf[b].mean()) for b in np.array_split(order, BINS)) / len(y))


def debiased_l2(probs: np.ndarray, y: np.ndarray) -> float:
    """Kumar et al. 2019's debiased estimate of the L2 calibration error, equal-mass bins."""
    conf, right = probs.max(1), (probs.argmax(1) == y).astype(float)
    order, total = np.argsort(conf, kind="mergesort"), 0.0
    for b in np.array_split(order, BINS):
        if len(b) < 2:
            continue
        a, c = right[b].mean(), conf[b].mean()
        total += len(b) / len(y) * ((a - c) ** 2 - a * (1 - a) / (len(b) - 1))
    return float(np.sqrt(max(total, 0.0)))


def temp_by_ece(z: np.ndarray, y: np.ndarray) -> float:
    grid = np.geomspace(0.2, 5.0, 161)
    return float(grid[int(np.argmin([ece(softmax(z / t), y) for t in grid]))])


def measure(vz: np.ndarray, vy: np.ndarray, tz: np.ndarray, ty: np.ndarray, draws: int = 1000) -> dict:
    t_nll = fit_temperature(vz, vy) or 1.0
    w, b = fit_vector(vz, vy, t_nll)
    t_ece = temp_by_ece(vz, vy)
    maps = {"raw": lambda z: z, "temp_nll": lambda z: z / t_nll, "vector_nll": lambda z: z * w + b,
            "temp_ece": lambda z: z / t_ece}
    rng = np.random.default_rng(0)
    idx = [rng.integers(0, len(ty), len(ty)) for _ in range(draws)]
    raw_p = softmax(tz)
    raw_boot = np.array([ece(raw_p[i], ty[i]) for i in idx])
    out = {"temperature_nll": t_nll, "temperature_ece": t_ece}
    for name, f in maps.items():
        p = softmax(f(tz))
        boot = np.array([ece(p[i], ty[i]) for i in idx])
        red = 1 - boot / np.maximum(raw_boot, 1e-12)
        out[name] = {"ece": ece(p, ty), "ece_ci95": np.percentile(boot, [2.5, 97.5]).tolist(),
                     "reduction": 1 - ece(p, ty) / ece(raw_p, ty), "reduction_ci95": np.percentile(red, [2.5, 97.5]).tolist(),
                     "ece_equal_mass": ece_equal_mass(p, ty), "debiased_l2": debiased_l2(p, ty),
                     "nll": nll(f(tz), ty), "accuracy": float((p.argmax(1) == ty).mean()), "floor": ece_floor(p, BINS),
                     "val_ece": ece(softmax(f(vz)), vy)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--roles", default="teacher,student")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    split = Split.load(args.run_dir / "split.json")
    results = {}
    for role in args.roles.split(","):
        model, meta = load_checkpoint(args.run_dir / "checkpoints" / f"{role}.safetensors")
        vz, vy = pytorch_reference(model, split, meta.preprocess, part="val")
        tz, ty = pytorch_reference(model, split, meta.preprocess, part="test")
        r = results[role] = measure(vz.astype(np.float64), vy, tz.astype(np.float64), ty)
        print(f"\n{role}: T(nll) {r['temperature_nll']:.3f}, T(ece) {r['temperature_ece']:.3f}, n_val {len(vy)}, "
              f"n_test {len(ty)}")
        print("| map | val ECE | test ECE [95% boot] | reduction vs raw [95% boot] | equal-mass ECE | debiased L2 "
              "| NLL | acc | floor |\n|---|---|---|---|---|---|---|---|---|")
        for name in ("raw", "temp_nll", "vector_nll", "temp_ece"):
            m = r[name]
            print(f"| {name} | {m['val_ece']:.4f} | {m['ece']:.4f} [{m['ece_ci95'][0]:.4f}, {m['ece_ci95'][1]:.4f}] "
                  f"| {m['reduction']:+.0%} [{m['reduction_ci95'][0]:+.0%}, {m['reduction_ci95'][1]:+.0%}] "
                  f"| {m['ece_equal_mass']:.4f} | {m['debiased_l2']:.4f} | {m['nll']:.4f} | {m['accuracy']:.4f} "
                  f"| {m['floor']:.4f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
