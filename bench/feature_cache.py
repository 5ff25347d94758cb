"""Feature extraction: train the head from cached backbone features vs re-running the
frozen backbone every epoch, side by side in one run.

    python bench/feature_cache.py                 # digits demo data, EfficientNet-Lite0 at 96 px, 20 epochs
    python bench/feature_cache.py --limit 300     # fewer training images, for a quick look

Both arms use the same `pipeline.training.fit` (same optimizer, schedule, seed, and a
validation pass every epoch); the only difference is whether the backbone runs
once (and its features are cached on disk) or in every epoch. Printed: the time of
each arm and the speed-up, with and without the one-time extraction, and both
arms' validation accuracy (the same features, so nearly the same head).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--input-size", type=int, default=96)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--limit", type=int, default=None, help="Use only N (random, seeded) training images.")
    args = ap.parse_args()

    import torch

    from pipeline.data import demo_data_dir, make_split
    from pipeline.features import cached_features, weights_digest
    from pipeline.models import create_model
    from pipeline.training import TrainSettings, fit, set_seed, tensor_loader
    from pipeline.strategies import AdaptData

    split = make_split(demo_data_dir(), 0.15, 0.2, seed=0)
    set_seed(0)
    model = create_model(args.model, len(split.class_names), "default")
    spec = model.defaults.preprocess(args.input_size, 1.0)
    data = AdaptData.from_split(split, spec)
    if args.limit:  # a seeded random subset (the split lists files class by class)
        keep = torch.randperm(len(split.train), generator=torch.Generator().manual_seed(0))[: args.limit]
        data = data.subset("train", sorted(keep.tolist()))
    settings = TrainSettings(epochs=args.epochs, lr=3e-3)
    x_train, y_train, x_val, y_val = data.x("train"), data.y("train"), data.x("val"), data.y("val")
    print(f"{args.model} at {spec.width}x{spec.height}px, {len(y_train)} train / {len(y_val)} val images, {args.epochs} epochs, "
          f"torch threads {torch.get_num_threads()}", flush=True)
    backbone = model.backbone.eval().requires_grad_(False)
    head0 = {k: v.clone() for k, v in model.head.state_dict().items()}

    # A: backbone once (features written to a fresh on-disk cache), then the head on the cache.
    with tempfile.TemporaryDirectory() as cache:
        os.environ["EDGEKILN_CACHE"] = cache
        digest = weights_digest(backbone)
        t0 = time.perf_counter()
        f_train = cached_features(backbone, args.model, data.paths["train"], data.labels("train"), spec, images=x_train, weights=digest)
        f_val = cached_features(backbone, args.model, data.paths["val"], data.labels("val"), spec, images=x_val, weights=digest)
        extract = time.perf_counter() - t0
        t0 = time.perf_counter()  # a second run reads the cache from disk
        f_train = cached_features(backbone, args.model, data.paths["train"], data.labels("train"), spec, weights=digest)
        f_val = cached_features(backbone, args.model, data.paths["val"], data.labels("val"), spec, weights=digest)
        read = time.perf_counter() - t0
    set_seed(0)
    model.head.load_state_dict(head0)
    t0 = time.perf_counter()
    res_a = fit(model.head, tensor_loader(f_train, y_train, batch_size=args.batch_size, shuffle=True), f_val, y_val,
                settings=settings, desc="head on cached features")
    train_cached = time.perf_counter() - t0

    # B: the frozen backbone runs in every epoch (train and validation images).
    set_seed(0)
    model.head.load_state_dict(head0)
    t0 = time.perf_counter()
    res_b = fit(model, tensor_loader(x_train, y_train, batch_size=args.batch_size, shuffle=True), x_val, y_val,
                settings=settings, desc="backbone every epoch")
    uncached = time.perf_counter() - t0

    warm = read + train_cached
    cold = extract + train_cached
    print()
    print(f"{'arm':<46}{'seconds':>10}{'val acc':>10}")
    print(f"{'A  one-time backbone pass (writes the cache)':<46}{extract:>10.2f}")
    print(f"{'A  read cache from disk':<46}{read:>10.3f}")
    print(f"{'A  head, ' + str(args.epochs) + ' epochs on cached features':<46}{train_cached:>10.2f}{res_a.best_val_accuracy:>10.4f}")
    print(f"{'B  backbone every epoch, ' + str(args.epochs) + ' epochs':<46}{uncached:>10.2f}{res_b.best_val_accuracy:>10.4f}")
    print()
    print(f"speed-up, cache warm (read + {args.epochs} epochs):          {uncached / warm:8.1f}x")
    print(f"speed-up, cache cold (extract once + {args.epochs} epochs):  {uncached / cold:8.1f}x")


if __name__ == "__main__":
    main()
