"""Domain shift benchmarks (issue 16): source-only against every `adapt.domain` method, scored on
labeled images of the target domain that no method ever trains on.

    python bench/domain_shift.py --out /tmp/domain_shift --seeds 0 1 2

Benchmarks, built offline and seeded:
- <photo set> -> dusk: a photo set of bench/photo_sets.py (textures, lfw_faces, scenes); half of each class
  is the labeled source, the other half goes through a cheap camera at dusk (Gaussian blur sigma 2 px at
  128 px, exposure x0.35, a blue cast, sensor noise sigma 6/255 before a JPEG at quality 75) and is split
  into the unlabeled target (what `data.target` holds) and the labeled target test set (scoring only);
- <photo set>-haze -> a second camera, designed as a held-out check of `auto`'s rule after it was set
  from the dusk benchmarks: a hazy, warm, low-contrast lens with horizontal motion blur and strong JPEG
  (160 px, 5-px horizontal box blur, contrast x0.55 toward a bright grey, a warm cast, noise sigma 3/255,
  JPEG quality 35) — motion blur and JPEG blocks are outside what `style` models;
- digits -> digits-m: scikit-learn's 8x8 digits at 32 px, against the same kind of digits blended with
  random crops of colour photographs, |photo - digit| per channel (the MNIST-M recipe of Ganin &
  Lempitsky 2015, with scikit-image's photographs instead of BSDS500).
Per seed: a new split of each set, then each method from the same pretrained model; `auto` is the method
`pipeline.domain.choose_unlabeled` picks without target labels (its score is that method's, same seed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
PHOTO_SETS = ("textures", "lfw_faces", "scenes")


def dusk(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The same scene through a cheap camera at dusk: blur, dark, blue, noisy, JPEG."""
    im = im.convert("RGB").resize((128, 128), Image.Resampling.BILINEAR).filter(ImageFilter.GaussianBlur(2))
    a = np.asarray(im).astype(np.float32) * 0.35 * np.array([0.85, 0.95, 1.15], dtype=np.float32)
    a = a + rng.normal(0, 6, a.shape)
    return Image.fromarray(a.clip(0, 255).astype(np.uint8))


def haze(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The same scene through a hazy, warm lens with motion blur (the JPEG comes at write time)."""
    im = im.convert("RGB").resize((160, 160), Image.Resampling.BILINEAR)
    im = im.filter(ImageFilter.Kernel((5, 5), [0] * 10 + [1] * 5 + [0] * 10, scale=5))  # horizontal motion
    a = np.asarray(im).astype(np.float32) * 0.55 + 0.45 * 215.0
    a = a * np.array([1.08, 1.0, 0.86], dtype=np.float32) + rng.normal(0, 3, a.shape)
    return Image.fromarray(a.clip(0, 255).astype(np.uint8))


SHIFTS = {"dusk": (dusk, 75), "haze": (haze, 35)}  # camera, JPEG quality


def _photo_crops(rng: np.random.Generator, n: int, side: int = 32) -> list[np.ndarray]:
    from skimage import data as skd

    photos = [skd.astronaut(), skd.coffee(), skd.chelsea(), skd.rocket()]
    out = []
    for _ in range(n):
        p = photos[int(rng.integers(len(photos)))]
        y, x = int(rng.integers(0, p.shape[0] - side)), int(rng.integers(0, p.shape[1] - side))
        out.append(p[y : y + side, x : x + side].astype(np.float32))
    return out


def _write(root: Path, cls: str, name: str, im: Image.Image, quality: int = 90) -> None:
    (root / cls).mkdir(parents=True, exist_ok=True)
    im.save(root / cls / f"{name}.jpg", quality=quality)


def build_photo(set_dir: Path, out: Path, shift: str = "dusk") -> Path:
    camera, quality = SHIFTS[shift]
    rng = np.random.default_rng(0)
    for cls_dir in sorted(d for d in set_dir.iterdir() if d.is_dir()):
        files = sorted(cls_dir.iterdir())
        order = rng.permutation(len(files))
        half, three_q = len(files) // 2, (3 * len(files)) // 4
        for k, i in enumerate(order):
            im = Image.open(files[i]).convert("RGB")
            if k < half:
                _write(out / "source", cls_dir.name, files[i].stem, im)
            else:
                part = "target" if k < three_q else "target_test"
                _write(out / part, cls_dir.name, files[i].stem, camera(im, rng), quality=quality)
    return out


def build_digits(out: Path, per_class: int = 80) -> Path:
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(0)
    for c in range(10):
        idx = rng.permutation(np.nonzero(d.target == c)[0])[: 2 * per_class]
        crops = _photo_crops(rng, len(idx))
        for k, i in enumerate(idx):
            g = np.asarray(Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8)).resize((32, 32), Image.Resampling.BILINEAR))
            if k < per_class:
                _write(out / "source", f"digit{c}", f"{i:04d}", Image.fromarray(g).convert("RGB"))
            else:
                m = np.abs(crops[k] - g[..., None].astype(np.float32))
                part = "target" if k < per_class * 3 // 2 else "target_test"
                _write(out / part, f"digit{c}", f"{i:04d}", Image.fromarray(m.clip(0, 255).astype(np.uint8)))
    return out


def build(name: str, out: Path, photo_root: Path) -> Path:
    root = out / "data" / name
    if (root / "target_test").is_dir():
        return root
    if name == "digits":
        return build_digits(root)
    base, _, shift = name.partition("-")
    return build_photo(photo_root / base, root, shift or "dusk")


def evaluate(root: Path, seed: int, methods: list[str], args) -> dict:
    """Target-test accuracy of every method (and the source test accuracy of source-only)."""
    import torch

    from pipeline.config import AdaptConfig
    from pipeline.data import make_split
    from pipeline.domain import choose_unlabeled, load_target, measure_gap
    from pipeline.domain.methods import run_method, target_accuracy
    from pipeline.models import create_model, model_defaults
    from pipeline.strategies import AdaptContext, AdaptData
    from pipeline.training import accuracy, set_seed

    split = make_split(root / "source", 0.15, 0.2, seed)
    spec = model_defaults(args.model).preprocess(args.input_size, 1.0)
    data = AdaptData.from_split(split, spec)
    target = load_target(root / "target", None, split.class_names, spec, seed)
    test = load_target(root / "target_test", root / "target_test", split.class_names, spec, seed)
    set_seed(seed)
    model = create_model(args.model, data.num_classes, "default", input_size=spec.crop)
    ctx = AdaptContext(arch=args.model, seed=seed, batch_size=32, desc=f"{root.name} s{seed}")
    gap, closer = measure_gap(model, data, target, args.model, seed)
    row = {"seed": seed, "gap": gap.accuracy, "closer": closer, "auto_choice": choose_unlabeled(gap, closer)[0],
           "device": str(next(model.parameters()).device) + ("+cuda" if torch.cuda.is_available() else "")}
    for m in methods:
        ft = m.endswith("_ft") or m == "dann"
        cfg = (AdaptConfig(strategy="finetune", epochs=args.ft_epochs, lr=args.ft_lr, ssl_steps=args.ssl_steps) if ft
               else AdaptConfig(ssl_steps=args.ssl_steps))
        set_seed(seed)
        t0 = time.perf_counter()
        out = run_method(m.removesuffix("_ft"), model, data, cfg, ctx, target)
        row[m] = target_accuracy(out.model, test)
        row[f"{m}_seconds"] = time.perf_counter() - t0
        if m == "none":
            row["source_test"] = accuracy(out.test_logits, data.y("test"))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/domain_shift"))
    ap.add_argument("--photo-root", type=Path, default=Path("/tmp/p14/photosets"),
                    help="bench/photo_sets.py's output (built there if missing)")
    ap.add_argument("--sets", nargs="+", default=["textures", "lfw_faces", "digits"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=["none", "style", "adabn", "ssl", "none_ft", "dann"])
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--input-size", type=int, default=96)
    ap.add_argument("--ft-epochs", type=int, default=6)
    ap.add_argument("--ft-lr", type=float, default=1e-3)
    ap.add_argument("--ssl-steps", type=int, default=100)
    ap.add_argument("--from-json", type=Path, default=None, help="Print the table of an earlier run's results.json.")
    args = ap.parse_args()
    if args.from_json:
        results = json.loads(args.from_json.read_text())
        print_table(results, [m for m in args.methods if m in next(iter(results.values()))[0]])
        return
    if any(s.partition("-")[0] in PHOTO_SETS for s in args.sets) and not (args.photo_root / "textures").is_dir():
        import subprocess

        subprocess.run([sys.executable, str(Path(__file__).parent / "photo_sets.py"), str(args.photo_root)], check=True)
    results = {}
    for name in args.sets:
        root = build(name, args.out, args.photo_root)
        results[name] = []
        for s in args.seeds:
            results[name].append(evaluate(root, s, args.methods, args))
            (args.out / "results.json").write_text(json.dumps(results, indent=1))
        print_table({name: results[name]}, args.methods)


def with_auto(row: dict) -> dict:
    """`auto`'s score: the method the current unlabeled rule picks from the recorded gap and share."""
    from pipeline.domain import choose_unlabeled
    from pipeline.domain.gap import DomainGap

    choice = choose_unlabeled(DomainGap(row["gap"], 0.0, 0, 0), row["closer"])[0]
    return {**row, "auto_choice": choice, "auto": row.get(choice, float("nan"))}


def print_table(results: dict, methods: list[str]) -> None:
    results = {name: [with_auto(r) for r in rows] for name, rows in results.items()}
    cols = ["source_test", *methods, "auto"]
    print("| benchmark | domain gap, styled nearer | " + " | ".join(cols) + " | auto chose | auto - none |")
    print("|---" * (len(cols) + 4) + "|")
    for name, rows in results.items():
        def ms(k, rows=rows):
            v = [r[k] for r in rows if r.get(k) == r.get(k) and k in r]  # present and not nan
            if not v:
                return "—"
            return f"{statistics.mean(v):.3f} ± {statistics.pstdev(v):.3f}"
        delta = statistics.mean(r["auto"] - r.get("none", float("nan")) for r in rows)
        choices = ",".join(r["auto_choice"] for r in rows)
        print(f"| {name} | {statistics.mean(r['gap'] for r in rows):.2f}, {statistics.mean(r['closer'] for r in rows):.2f} | "
              + " | ".join(ms(k) for k in cols) + f" | {choices} | {100 * delta:+.1f} |", flush=True)


if __name__ == "__main__":
    main()
