"""Backbone features computed once and cached on disk, and the linear probe on them.

A frozen backbone in eval mode is a fixed function of each image, so with no
augmentation its features need computing once. The cache key covers
everything the features depend on: the architecture, the backbone's weights
(hashed), the image files (path, size, mtime, in order) and the preprocessing.
Entries live in `$EDGEKILN_CACHE/features/<key>.safetensors`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.data import cache_dir, load_tensors
from pipeline.training import accuracy, predict_logits
from runtime.files import atomic_path
from runtime.preprocess import PreprocessSpec

log = logging.getLogger("edgekiln")

CACHE_VERSION = 1


def weights_digest(module: nn.Module) -> str:
    """sha256 over the module's state dict (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def files_digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        st = os.stat(p)
        h.update(f"{Path(p).resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def feature_cache_key(arch: str, weights: str, paths: list[Path], spec: PreprocessSpec) -> str:
    parts = {"v": CACHE_VERSION, "arch": arch, "weights": weights, "files": files_digest(paths), "transform": spec.to_dict()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def features_cache_dir() -> Path:
    return cache_dir() / "features"


def cached_features(
    backbone: nn.Module,
    arch: str,
    paths: list[Path],
    labels: list[int],
    spec: PreprocessSpec,
    images: torch.Tensor | None = None,
    weights: str | None = None,
    use_cache: bool = True,
    desc: str = "features",
) -> torch.Tensor:
    """Backbone features of `paths`, read from the cache when the key matches, else computed and stored.

    weights: the backbone's `weights_digest` (computed when not given).
    images: the preprocessed images, if already loaded (else they are loaded only on a cache miss).
    """
    if not use_cache:
        x = images if images is not None else load_tensors(paths, labels, spec, desc=f"loading {desc} images")[0]
        return predict_logits(backbone, x, desc=f"backbone {desc}")
    from safetensors.torch import load_file, save_file

    key = feature_cache_key(arch, weights or weights_digest(backbone), paths, spec)
    path = features_cache_dir() / f"{key}.safetensors"
    if path.is_file():
        try:
            f = load_file(str(path))["features"]
            if len(f) == len(paths):
                log.debug("feature cache hit: %s", path)
                return f
        except Exception as e:  # a damaged entry is recomputed, never trusted
            log.warning("ignoring unreadable feature cache entry %s (%s)", path, e)
    x = images if images is not None else load_tensors(paths, labels, spec, desc=f"loading {desc} images")[0]
    f = predict_logits(backbone, x, desc=f"backbone {desc}")
    try:
        with atomic_path(path) as tmp:
            save_file({"features": f.contiguous()}, str(tmp), metadata={"arch": arch, "n": str(len(paths))})
    except OSError as e:  # a read-only or full cache must not fail the run
        log.warning("could not write the feature cache %s (%s)", path, e)
    return f


def fit_logistic_regression(train_f: torch.Tensor, train_y: torch.Tensor, num_classes: int, C: float = 1.0, seed: int = 0,
                            balance: str = "none"):
    """scikit-learn logistic regression on standardised features, folded into (weight, bias)
    of an equivalent nn.Linear: logits = W x + b reproduce the classifier's decision function.

    balance 'weights' or 'sampler' (data.balance) fits with the inverse-frequency class weights of
    `pipeline.training.class_weights`: a full-batch fit has no batches to sample, and drawing every
    class equally often weighs the loss the same way in expectation."""
    from sklearn.linear_model import LogisticRegression

    from pipeline.training import class_weights

    x = train_f.double().numpy()
    y = train_y.numpy()
    mu, sd = x.mean(0), x.std(0) + 1e-6
    weight = None
    if balance != "none":
        w = class_weights(train_y, num_classes)
        weight = {int(c): float(w[c]) for c in np.unique(y)}
    clf = LogisticRegression(C=C, max_iter=2000, random_state=seed, class_weight=weight)
    clf.fit((x - mu) / sd, y)
    coef = np.zeros((num_classes, x.shape[1]))
    intercept = np.zeros(num_classes)
    present = clf.classes_
    if len(present) == 2 and clf.coef_.shape[0] == 1:  # binary: one decision function -> two symmetric logits
        coef[present[1]], intercept[present[1]] = clf.coef_[0] / 2, clf.intercept_[0] / 2
        coef[present[0]], intercept[present[0]] = -clf.coef_[0] / 2, -clf.intercept_[0] / 2
    else:
        coef[present], intercept[present] = clf.coef_, clf.intercept_
        missing = np.setdiff1d(np.arange(num_classes), present)
        intercept[missing] = -1e4  # a class never seen in training is never predicted
    w = coef / sd
    b = intercept - (coef * (mu / sd)).sum(1)
    return torch.tensor(w, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)


def linear_probe(train_f, train_y, eval_f, eval_y, num_classes: int, C: float = 1.0, seed: int = 0,
                 balance: str = "none") -> tuple[float, torch.Tensor]:
    """(accuracy, logits) of a logistic-regression probe trained on `train_f`, evaluated on `eval_f`."""
    w, b = fit_logistic_regression(train_f, train_y, num_classes, C, seed, balance)
    logits = eval_f.float() @ w.T + b
    return accuracy(logits, eval_y), logits
