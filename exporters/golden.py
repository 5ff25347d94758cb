"""Golden images: a few held-out (test split) images copied into the bundle with
their expected PyTorch logits, so any runtime can prove it reproduces the
training side without the training side (`edgekiln validate --bundle DIR`, and
the runtime's own self-test).

bundle.json:  "golden": {"files": ["golden-00.png", ...],
                         "logits": [[float, ...], ...],   # PyTorch, one row per file
                         "atol": 0.001}                    # on the FP32 artifact's logits
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from exporters.parity import artifact_logits
from exporters.tensorrt import TensorRTUnavailable
from runtime.bundle import Bundle, parse_manifest
from runtime.preprocess import PreprocessSpec, preprocess


def pick_golden(items: list[tuple[str, int]], n_classes: int, count: int) -> list[int]:
    """Indices of `count` items, one class after another (round-robin), first files first."""
    by_class: dict[int, list[int]] = {c: [] for c in range(n_classes)}
    for i, (_, y) in enumerate(items):
        by_class[y].append(i)
    picked: list[int] = []
    depth = 0
    while len(picked) < min(count, len(items)):
        for c in range(n_classes):
            if depth < len(by_class[c]) and len(picked) < count:
                picked.append(by_class[c][depth])
        depth += 1
    return picked


def write_golden(bundle_dir: Path, sources: list[Path], logits: np.ndarray, atol: float) -> dict[str, Any]:
    """Copy `sources` into `bundle_dir` as golden-NN.<ext>; return bundle.json's "golden" section."""
    files = []
    for i, src in enumerate(sources):
        name = f"golden-{i:02d}{Path(src).suffix.lower() or '.png'}"
        shutil.copyfile(src, Path(bundle_dir) / name)
        files.append(name)
    return {"files": files, "logits": np.asarray(logits, dtype=np.float64).round(7).tolist(), "atol": float(atol)}


def self_test(bundle_dir: Path, meta: dict[str, Any], keys: list[str] | None = None,
              runners: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run every artifact on the golden images. FP32 artifacts must match the stored PyTorch
    logits within atol (and the same top-1); other precisions are reported (agreement, max |Δ|).
    `runners` (artifact key -> preprocessed batch -> logits, e.g. the parity gate's) are used
    where given, so their sessions are not opened again."""
    golden = meta.get("golden")
    if not golden or not golden.get("files"):
        return {"checked": False, "failures": ["bundle has no golden images (re-export it with this edgekiln)"]}
    _, paths, expected, atol = Bundle(Path(bundle_dir), parse_manifest(meta)).golden()  # the runtime's checks of the section
    results, failures = {}, []
    x = None  # the golden images preprocessed, once, for the given runners
    for key in keys or list(meta.get("artifacts", {})):
        art = meta["artifacts"][key]
        try:
            if runners and key in runners:
                if x is None:
                    x = preprocess(paths, PreprocessSpec.from_dict(meta["preprocess"]))
                got = np.asarray(runners[key](x), np.float64)
            else:
                got = artifact_logits(Path(bundle_dir), meta, key, paths).astype(np.float64)
        except (ImportError, TensorRTUnavailable) as e:  # e.g. a TensorRT engine on a machine without tensorrt
            results[key] = {"skipped": str(e)}
            continue
        diff = float(np.abs(got - expected).max()) if got.size else 0.0
        agree = float((got.argmax(1) == expected.argmax(1)).mean()) if got.size else 1.0
        strict = art.get("precision") == "fp32"
        ok = (diff <= atol and agree == 1.0) if strict else True
        results[key] = {"max_abs_logit_diff": diff, "agreement": agree, "strict": strict, "passed": ok}
        if not ok:
            failures.append(f"{key} ({art['file']}): max |Δlogit| {diff:.3g} vs atol {atol:.3g}, "
                            f"top-1 agreement {agree:.0%} on {len(paths)} golden images")
    return {"checked": True, "images": len(paths), "artifacts": results, "failures": failures}
