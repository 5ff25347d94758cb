"""data.balance on a 10:1 imbalanced set built from real images (issue 18): macro-F1 and the
minority classes' recall of the adapted teacher with balance none / weights / sampler, side by side,
over several seeds. Every run: `edgekiln adapt DIR --set data.balance=...` (EfficientNet-Lite0,
feature extraction, the config's defaults otherwise; input 96 px for the 8x8 scans).

    PYTHONPATH=. python bench/imbalance.py /tmp/imbalance --seeds 0,1,2 [--select-metric macro_f1]

The set: scikit-learn's digits (real scanned handwriting, 8x8), classes 0-4 with 170 images each
and classes 5-9 with 17 each (10:1). Not a test.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np


def build(root: Path, major: int = 170, minor: int = 17) -> Path:
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    if root.is_dir():
        return root
    for c in range(10):
        (root / str(c)).mkdir(parents=True)
        for i in np.nonzero(d.target == c)[0][: major if c < 5 else minor]:
            px = np.round(d.images[i] * (255 / 16)).astype(np.uint8)
            Image.fromarray(px, mode="L").save(root / str(c) / f"{i:04d}.png")
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--select-metric", default="accuracy", choices=["accuracy", "macro_f1"],
                    help="data.select_metric of every run (what picks the best epoch)")
    args = ap.parse_args()
    from pipeline.adapt_stage import run_adapt
    from pipeline.config import load_config

    data = build(args.workdir / "digits_10to1")
    seeds = [int(s) for s in args.seeds.split(",")]
    rows: dict[str, list[tuple[float, float, float]]] = {}
    for balance in ("none", "weights", "sampler"):
        for seed in seeds:
            cfg = load_config(data, [f"runs_dir={args.workdir / 'runs'}", f"name=b-{balance}-{seed}-{args.select_metric}", f"seed={seed}",
                                     f"data.select_metric={args.select_metric}",
                                     "model.input_size=96", "model.crop_pct=1.0", f"data.balance={balance}",
                                     "distill.enabled=false"])
            r = run_adapt(cfg)
            minority = [r.per_class[str(c)]["recall"] for c in range(5, 10)]
            rows.setdefault(balance, []).append((r.macro_f1, r.test_accuracy, float(np.mean(minority))))
            print(f"{balance:8s} seed {seed}: macro-F1 {r.macro_f1:.4f}, accuracy {r.test_accuracy:.4f}, "
                  f"minority recall {np.mean(minority):.4f}", flush=True)
    print("\n| balance | macro-F1 (mean of seeds) | accuracy | minority-class recall | macro-F1 vs none |")
    print("|---|---|---|---|---|")
    base = statistics.mean(f for f, _, _ in rows["none"])
    for balance, vals in rows.items():
        f1 = statistics.mean(v[0] for v in vals)
        print(f"| {balance} | {f1:.4f} ({', '.join(f'{v[0]:.3f}' for v in vals)}) | "
              f"{statistics.mean(v[1] for v in vals):.4f} | {statistics.mean(v[2] for v in vals):.4f} | "
              f"{(f1 - base) * 100:+.1f} pts |")


if __name__ == "__main__":
    main()
