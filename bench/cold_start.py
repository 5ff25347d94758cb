"""Cold start: the torch-free runtime vs the same with torch imported, in fresh processes.

    PYTHONPATH=. python bench/cold_start.py [BUNDLE] [--repeats 5]

Each measurement is a new Python process timing, from its first line, import
+ bundle load (hash check, onnxruntime session) + the first prediction on one
image. Variants, run alternately so machine load hits them alike:

  runtime          import runtime; runtime.load(bundle).predict(img)
  runtime+torch    import torch first, then exactly the same
  torch-native     the PyTorch deployment it replaces: import torch + the
                   training side, load the safetensors checkpoint, eval
                   transform, forward (only when the run's checkpoints exist)

The acceptance ratio is runtime+torch / runtime (target >= 3x); the medians
and the interpreter's own start-up (python -c pass) are printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PRELUDE = "import time; t0 = time.perf_counter()\n"
RUNTIME = """
import runtime
clf = runtime.load({bundle!r})
p = clf.predict([{image!r}])[0]
"""
TORCH_FIRST = "import torch\n" + RUNTIME
TORCH_NATIVE = """
import torch
from pipeline.checkpoint import load_checkpoint
from pipeline.data import eval_transform
from runtime.preprocess import open_image
model, meta = load_checkpoint(__import__('pathlib').Path({ckpt!r}))
model.eval()
with torch.no_grad():
    y = model(eval_transform(meta.preprocess)(open_image({image!r}))[None])
"""
EPILOGUE = "\nprint(time.perf_counter() - t0)\n"


def run_once(code: str, env: dict) -> float:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    if r.returncode != 0:
        raise SystemExit(f"variant failed:\n{code}\n{r.stderr[-2000:]}")
    return float(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", nargs="?", type=Path, default=Path("/tmp/runs/demo/bundle"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if not (args.bundle / "bundle.json").is_file():
        raise SystemExit(f"{args.bundle}: not a bundle; run `edgekiln demo --runs-dir /tmp/runs` or pass a bundle path")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    with tempfile.TemporaryDirectory() as tmp:
        import numpy as np
        from PIL import Image

        image = str(Path(tmp) / "digit.png")
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8), dtype=np.uint8), mode="L").save(image)
        from runtime.bundle import read_bundle

        role = read_bundle(args.bundle, verify=False).manifest.model.role
        ckpt = args.bundle.parent / "checkpoints" / f"{role}.safetensors"
        variants = {
            "runtime": RUNTIME.format(bundle=str(args.bundle), image=image),
            "runtime+torch": TORCH_FIRST.format(bundle=str(args.bundle), image=image),
        }
        if ckpt.is_file():
            variants["torch-native"] = TORCH_NATIVE.format(ckpt=str(ckpt), image=image)
        times: dict[str, list[float]] = {k: [] for k in variants}
        interp = []
        for name, code in variants.items():  # one untimed run each: warm the OS file cache alike
            run_once(PRELUDE + code + EPILOGUE, env)
        for _ in range(args.repeats):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", "pass"], check=True, env=env)
            interp.append(time.perf_counter() - t)
            for name, code in variants.items():
                times[name].append(run_once(PRELUDE + code + EPILOGUE, env))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nedgekiln cold start: import + load + first prediction, fresh process each, {args.repeats} repeats "
          f"(median; min..max) | {args.bundle}")
    for k, v in times.items():
        print(f"  {k:14s} {med[k] * 1000:8.0f} ms   ({min(v) * 1000:.0f}..{max(v) * 1000:.0f})")
    print(f"  (python -c pass: {statistics.median(interp) * 1000:.0f} ms, not included above)")
    ratio = med["runtime+torch"] / med["runtime"]
    print(f"ratio runtime+torch / runtime: {ratio:.2f}x (target >= 3x)")
    if "torch-native" in med:
        print(f"ratio torch-native / runtime: {med['torch-native'] / med['runtime']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"times_s": times, "median_s": med, "ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
