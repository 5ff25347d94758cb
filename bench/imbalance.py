"""data.balance on 10:1 imbalanced sets built from real images (issue 18): test macro-F1 and the
minority classes' recall of the adapted teacher with balance none / weights / sampler, side by side,
over several seeds, with paired 95% intervals of each mode's gain over `none`.

    PYTHONPATH=. python bench/imbalance.py /tmp/imb --seeds 0,1,2,3,4 [--sets digits-balanced-test,...]
        [--select-metric accuracy,macro_f1]

What runs: the pipeline's own `feature_extraction` strategy (`pipeline.strategies.adapt_model`:
the linear head, the training budget, data.balance, data.select_metric, best-epoch selection), as
`edgekiln adapt` runs it, EfficientNet-Lite0 with its pretrained weights. The backbone is frozen, so
the features of every image are computed once (through the pipeline's preprocessing and feature
cache) and each seed's split indexes them: a full `edgekiln adapt` per seed and mode took 6 minutes
on the shared 2-core machine, almost all of it outside the head's training.

The sets (real images, no download):
- digits-stratified: scikit-learn's digits (scanned handwriting, 8x8, at 96 px), classes 0-4 with
  170 images and 5-9 with 17; the pipeline's stratified split (val 0.15, test 0.2), so the test split
  is 10:1 too and holds 3-4 images per minority class (what the earlier bench measured).
- digits-balanced-test: the long-tail protocol (Cui et al. 2019, Cao et al. 2019): train and val
  10:1 (per class 100 + 20 images for 0-4, 10 + 2 for 5-9), the test split balanced, 50 images of
  every class (500), drawn per seed.
- digits-reference (not in the default --sets): the same head on balanced digits training sets (every
  class at 10 + 2 images, and at 100 + 20), the same balanced test split: the ceiling a rebalanced
  10:1 model can approach.
- --shift-curve: for the digits sets, macro-F1 of `none` and `weights` (without the shift adapt adds,
  pipeline.training.balance.PRIOR_SHIFT_TAU) after a post-hoc logit shift of tau * log(training prior), tau
  from 0 to 1.5: which rule is best depends on the test split's class mix.
- photos-balanced-test: random crops (bench/photo_sets.py's) of ten scikit-image photographs (at
  128 px); train and val 10:1 (100 + 20, 10 + 2), the test split 40 fresh crops of every class.
Not a test.
"""

from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path

import numpy as np
import torch

MAJOR, MINOR = range(5), range(5, 10)
PHOTOS = ("brick", "grass", "astronaut", "coffee", "camera", "gravel", "moon", "chelsea", "rocket",
          "immunohistochemistry")  # the first five are the majority classes


def build(root: Path, major: int = 170, minor: int = 17) -> Path:
    """The digits 10:1 ImageFolder of the earlier bench (also what `edgekiln adapt` can be run on)."""
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


def digits_pool(root: Path) -> tuple[list[Path], list[int]]:
    """Every digits image (1,797) as a PNG, with its label."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    paths = [root / str(int(c)) / f"{i:04d}.png" for i, c in enumerate(d.target)]
    if not root.is_dir():
        for p, img in zip(paths, d.images):
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.round(img * (255 / 16)).astype(np.uint8), mode="L").save(p)
    return paths, [int(c) for c in d.target]


def photos_pool(root: Path, per_class: int = 162) -> tuple[list[Path], list[int]]:
    """`per_class` random crops of each of the ten photographs (seeded), as JPEG files."""
    import skimage.data

    from bench.photo_sets import _crops, _save

    if not root.is_dir():
        rng = np.random.default_rng(0)
        for cls in PHOTOS:
            _save(root, cls, _crops(getattr(skimage.data, cls)(), per_class, rng))
    paths, labels = [], []
    for c, cls in enumerate(PHOTOS):
        files = sorted((root / cls).glob("*.jpg"))
        paths += files
        labels += [c] * len(files)
    return paths, labels


def split_balanced_test(labels: list[int], seed: int, test: int, major: tuple[int, int], minor: tuple[int, int]):
    """Indices of train / val (10:1) and a balanced test split, drawn per class with `seed`."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    y = np.asarray(labels)
    for c in range(10):
        idx = rng.permutation(np.nonzero(y == c)[0])
        n_train, n_val = major if c in MAJOR else minor
        parts["test"] += idx[:test].tolist()
        parts["val"] += idx[test : test + n_val].tolist()
        parts["train"] += idx[test + n_val : test + n_val + n_train].tolist()
    return parts


def split_stratified(labels: list[int], seed: int):
    """The pipeline's own stratified split (pipeline.data.split_items) of 170/17 images per class."""
    from pipeline.data import split_items

    y = np.asarray(labels)
    keep = [i for c in range(10) for i in np.nonzero(y == c)[0][: 170 if c in MAJOR else 17]]
    items = [(f"{i}", int(y[i])) for i in keep]
    s = split_items(Path("."), [str(c) for c in range(10)], items, 0.15, 0.2, seed)
    return {part: [int(p) for p, _ in getattr(s, part)] for part in ("train", "val", "test")}


class Pool:
    """A set's images, their labels, and the frozen backbone's features of every one (computed once)."""

    def __init__(self, paths: list[Path], labels: list[int], size: int, class_names: list[str]):
        from pipeline.features import cached_features, weights_digest
        from pipeline.models import create_model, model_defaults

        self.arch = "efficientnet_lite0"
        self.spec = model_defaults(self.arch).preprocess(size, 1.0)
        self.model = create_model(self.arch, 10, "default", input_size=self.spec.crop)
        self.digest = weights_digest(self.model.backbone)
        self.paths, self.labels, self.class_names = paths, labels, class_names
        self.features = cached_features(self.model.backbone.eval(), self.arch, paths, labels, self.spec,
                                        weights=self.digest, desc="pool features")

    def images(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every image preprocessed (evaluation transform) and as a uint8 crop (for augmentation)."""
        if not hasattr(self, "_images"):
            from pipeline.data import load_tensors
            from pipeline.strategies.data import load_uint8

            self._images = (load_tensors(self.paths, self.labels, self.spec, desc="pool images")[0],
                            load_uint8(self.paths, self.spec))
        return self._images

    head = "linear"  # adapt.feature_extraction.head (--head)
    augment = "none"  # adapt.augment (--augment): other than none, the backbone runs on augmented views every epoch

    def adapt(self, parts: dict[str, list[int]], seed: int, balance: str, metric: str, shift: bool = True) -> torch.Tensor:
        """Test logits of the feature_extraction strategy trained on `parts` (indices into the pool), with
        the shift towards the rare classes that `edgekiln adapt` gives the head (shift_to_rare) unless
        `shift` is False."""
        from pipeline.config import AdaptConfig
        from pipeline.strategies import AdaptContext, AdaptData, adapt_model, shift_to_rare
        from pipeline.training import set_seed

        data = AdaptData({p: [self.paths[i] for i in ix] for p, ix in parts.items()},
                         {p: [self.labels[i] for i in ix] for p, ix in parts.items()}, self.spec, self.class_names)
        for p, ix in parts.items():  # what AdaptData.features would read from the feature cache
            data._memo["f", p, self.digest] = self.features[torch.tensor(ix)]
            if self.augment != "none":  # the images themselves, loaded once for the pool
                data._memo["x", p], data._memo["u8", p] = self.images()[0][ix], self.images()[1][ix]
        set_seed(seed)
        ctx = AdaptContext(arch=self.arch, seed=seed, batch_size=64, balance=balance, select_metric=metric,
                           desc=f"{balance}/{metric}/seed {seed}")
        cfg = AdaptConfig(feature_extraction={"head": self.head}, augment=self.augment)
        out = adapt_model(copy.deepcopy(self.model), data, cfg, ctx)
        return (shift_to_rare(out, data, balance) if shift else out).test_logits


def scores(logits: torch.Tensor, y: np.ndarray) -> tuple[float, float, float]:
    from sklearn.metrics import f1_score, recall_score

    pred = logits.argmax(1).numpy()
    minority = recall_score(y, pred, labels=list(MINOR), average="macro", zero_division=0)
    return (f1_score(y, pred, labels=list(range(10)), average="macro", zero_division=0),
            float((pred == y).mean()), minority)


def fast_macro_f1(y: np.ndarray, pred: np.ndarray, k: int = 10) -> float:
    """scikit-learn's macro-F1 (zero_division=0) from a confusion count, fast enough to bootstrap."""
    cm = np.bincount(y * k + pred, minlength=k * k).reshape(k, k)
    tp = np.diag(cm)
    denom = cm.sum(0) + cm.sum(1)
    return float(np.mean(np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)))


def paired_interval(preds: list[tuple[np.ndarray, np.ndarray, np.ndarray]], n_boot: int = 2000) -> tuple[float, float]:
    """95% paired bootstrap interval of the gain in macro-F1 (mean over seeds): per seed, the same
    resampled test images score both models."""
    rng = np.random.default_rng(0)
    gains = np.zeros(n_boot)
    for y, a, b in preds:
        for k in range(n_boot):
            i = rng.integers(0, len(y), len(y))
            gains[k] += fast_macro_f1(y[i], b[i]) - fast_macro_f1(y[i], a[i])
    gains /= len(preds)
    return float(np.percentile(gains, 2.5)), float(np.percentile(gains, 97.5))


def seed_interval(diffs: list[float]) -> tuple[float, float]:
    """95% t-interval of the mean per-seed gain (the spread of seeds: data draw and training)."""
    from scipy import stats

    m = statistics.mean(diffs)
    if len(diffs) < 2:
        return m, m
    h = stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / len(diffs) ** 0.5
    return m - h, m + h


def set_parts(name: str, labels: list[int], seed: int) -> dict[str, list[int]]:
    """The train / val / test indices of set `name` for `seed`."""
    if name == "digits-stratified":
        return split_stratified(labels, seed)
    test = 50 if name == "digits-balanced-test" else 40  # photos-balanced-test: 40 of every class
    return split_balanced_test(labels, seed, test, (100, 20), (10, 2))


def run_set(name: str, pool: Pool, seeds: list[int], metrics: list[str],
            modes: tuple[str, ...] = ("none", "weights", "sampler")) -> None:
    for metric in metrics:
        rows: dict[str, list] = {}
        for seed in seeds:
            parts = set_parts(name, pool.labels, seed)
            y = np.asarray([pool.labels[i] for i in parts["test"]])
            for balance in modes:
                logits = pool.adapt(parts, seed, balance, metric)
                rows.setdefault(balance, []).append((scores(logits, y), y, logits.argmax(1).numpy()))
                f1, acc, rec = rows[balance][-1][0]
                print(f"{name} {metric} seed {seed} {balance:8s}: macro-F1 {f1:.4f} accuracy {acc:.4f} "
                      f"minority recall {rec:.4f}", flush=True)
        n_test = len(rows["none"][0][1])
        print(f"\n{name}, data.select_metric {metric}, seeds {','.join(map(str, seeds))}, test {n_test} images\n")
        print("| balance | macro-F1 mean (per seed) | accuracy | minority recall | gain vs none, pts "
              "[95% paired bootstrap] [95% t over seeds] |")
        print("|---|---|---|---|---|")
        base = rows["none"]
        for balance, vals in rows.items():
            f1s = [v[0][0] for v in vals]
            gain = ""
            if balance != "none":
                lo, hi = paired_interval([(b[1], b[2], v[2]) for b, v in zip(base, vals)])
                tlo, thi = seed_interval([v[0][0] - b[0][0] for b, v in zip(base, vals)])
                gain = (f"{(statistics.mean(f1s) - statistics.mean(b[0][0] for b in base)) * 100:+.1f} "
                        f"[{lo * 100:+.1f}, {hi * 100:+.1f}] [{tlo * 100:+.1f}, {thi * 100:+.1f}]")
            print(f"| {balance} | {statistics.mean(f1s):.4f} ({', '.join(f'{f:.3f}' for f in f1s)}) | "
                  f"{statistics.mean(v[0][1] for v in vals):.4f} | {statistics.mean(v[0][2] for v in vals):.4f} | "
                  f"{gain} |", flush=True)
        print()


def run_shift_curve(name: str, pool: Pool, seeds: list[int], taus=(0.0, 0.25, 0.5, 0.75, 1.0, 1.5)) -> None:
    """Where `none` and `weights` sit on the family of decision rules that favour the rare classes more or
    less: macro-F1 after subtracting tau * log(training class prior) from the test logits (post-hoc logit
    adjustment, Menon et al. 2021; tau = 1 aims at the balanced error). The tau that is best depends on the
    test split's class mix, which training cannot see."""
    res: dict[tuple[str, float], list[float]] = {}
    for seed in seeds:
        parts = set_parts(name, pool.labels, seed)
        y = np.asarray([pool.labels[i] for i in parts["test"]])
        counts = np.bincount([pool.labels[i] for i in parts["train"]], minlength=10)
        log_prior = torch.tensor(np.log(counts / counts.sum()), dtype=torch.float32)
        for balance in ("none", "weights"):
            logits = pool.adapt(parts, seed, balance, "accuracy", shift=False)
            for tau in taus:
                res.setdefault((balance, tau), []).append(scores(logits - tau * log_prior, y)[0])
    print(f"\n{name}: macro-F1 (mean over seeds {','.join(map(str, seeds))}) after a post-hoc shift of tau * log prior\n")
    print("| balance | " + " | ".join(f"tau {t:g}" for t in taus) + " |")
    print("|---|" + "---|" * len(taus))
    for balance in ("none", "weights"):
        print(f"| {balance} | " + " | ".join(f"{statistics.mean(res[balance, t]):.4f}" for t in taus) + " |", flush=True)


def run_reference(pool: Pool, seeds: list[int]) -> None:
    """Where the 10:1 figures sit: the same head trained on balanced digits, every class at the
    minority's 10 + 2 images and at the majority's 100 + 20, the same balanced test split."""
    print("\n| digits, balanced training (balance none) | macro-F1 mean (per seed) | accuracy | recall of 5-9 |")
    print("|---|---|---|---|")
    for name, n in (("every class 10 + 2", (10, 2)), ("every class 100 + 20", (100, 20))):
        res = []
        for seed in seeds:
            parts = split_balanced_test(pool.labels, seed, 50, n, n)
            res.append(scores(pool.adapt(parts, seed, "none", "accuracy"), np.asarray([pool.labels[i] for i in parts["test"]])))
        print(f"| {name} | {statistics.mean(r[0] for r in res):.4f} ({', '.join(f'{r[0]:.3f}' for r in res)}) | "
              f"{statistics.mean(r[1] for r in res):.4f} | {statistics.mean(r[2] for r in res):.4f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--sets", default="digits-balanced-test,digits-stratified,photos-balanced-test")
    ap.add_argument("--modes", default="none,weights,sampler", help="data.balance values to run (none first)")
    ap.add_argument("--select-metric", default="accuracy,macro_f1",
                    help="data.select_metric values to run (what picks the best epoch)")
    ap.add_argument("--shift-curve", action="store_true",
                    help="instead of the balance table: macro-F1 of none and weights after post-hoc logit shifts")
    ap.add_argument("--head", default="linear", choices=["linear", "logistic_regression"],
                    help="adapt.feature_extraction.head")
    ap.add_argument("--augment", default="none", choices=["none", "light", "strong"], help="adapt.augment")
    args = ap.parse_args()
    Pool.head, Pool.augment = args.head, args.augment
    seeds = [int(s) for s in args.seeds.split(",")]
    metrics = args.select_metric.split(",")
    digits = None
    for name in args.sets.split(","):
        if name.startswith("digits"):
            digits = digits or Pool(*digits_pool(args.workdir / "digits_all"), 96, [str(c) for c in range(10)])
            if name == "digits-reference":
                run_reference(digits, seeds)
            elif args.shift_curve:
                run_shift_curve(name, digits, seeds)
            else:
                run_set(name, digits, seeds, metrics, tuple(args.modes.split(",")))
        elif name == "photos-balanced-test":
            run_set(name, Pool(*photos_pool(args.workdir / "photos_all"), 128, list(PHOTOS)), seeds, metrics,
                    tuple(args.modes.split(",")))
        else:
            raise SystemExit(f"unknown set {name}")


if __name__ == "__main__":
    main()
