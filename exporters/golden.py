"""Golden images: a few held-out (test split) images copied into the bundle with
their expected PyTorch logits, so any runtime can prove it reproduces the
training side without the training side (`edgekiln validate --bundle DIR`, and
the runtime's own self-test).

bundle.json:  "golden": {"files": ["golden-00.png", ...],
                         "logits": [[float, ...], ...],   # PyTorch, one row per file
                         "atol": 0.001,                    # on the FP32 artifact's logits
                         "artifacts": {"onnx_int8": {"logits": [[...]], "atol": 0.31}}}
An INT8/FP16 artifact's own logits, as export ran it, are recorded the first time the self-test
runs it; from then on it is held to them, within its own distance from the FP32 logits (a runtime
may round differently, by about as much as the precision itself does) and with the same top-1.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np

from exporters.calibration import stratified_indices
from runtime.bundle import Bundle, Golden, GoldenOutputs
from runtime.preprocess import preprocess


def pick_golden(items: list[tuple[str, int]], n_classes: int, count: int) -> list[int]:
    """Indices of `count` items, one class after another (round-robin), first files first."""
    return stratified_indices([y for _, y in items], count, n_classes, seed=None, interleave=True)


def write_golden(bundle_dir: Path, sources: list[Path], logits: np.ndarray, atol: float) -> Golden:
    """Copy `sources` into `bundle_dir` as golden-NN.<ext>; return bundle.json's "golden" section."""
    files = []
    for i, src in enumerate(sources):
        name = f"golden-{i:02d}{Path(src).suffix.lower() or '.png'}"
        shutil.copyfile(src, Path(bundle_dir) / name)
        files.append(name)
    return Golden(files=files, logits=np.asarray(logits, dtype=np.float64).round(7).tolist(), atol=float(atol))


def self_test(bundle: Bundle, keys: list[str] | None = None,
              runners: dict[str, Callable[[np.ndarray], np.ndarray]] | None = None) -> dict[str, Any]:
    """Run every artifact on the golden images. FP32 artifacts must match the stored PyTorch
    logits within atol (and the same top-1), other precisions their own recorded logits; one
    without a record is reported (agreement, max |Δ|) and its record returned under "outputs"
    (artifact key -> GoldenOutputs) for bundle.json. Artifacts open through the runtime's backends
    (exporters.parity.open_runners) unless `runners` (artifact key -> preprocessed batch -> logits,
    e.g. the parity gate's) has them."""
    from exporters.parity import open_runners

    m = bundle.manifest
    if m.golden is None:
        return {"checked": False, "failures": ["bundle has no golden images (re-export it with this edgekiln)"]}
    _, paths, _, atol = bundle.golden()  # the runtime's checks of the section
    keys = keys or list(m.artifacts)
    opened, skipped = open_runners(bundle, [k for k in keys if k not in (runners or {})])
    runners = {**(runners or {}), **opened}
    x = preprocess(paths, bundle.preprocess)
    results, failures, outputs = {}, [], {}
    for key in keys:
        art = m.artifacts[key]
        if key not in runners:
            results[key] = {"skipped": skipped.get(key, "not run")}
            continue
        got = np.asarray(runners[key](x), np.float64)
        strict = art.precision == "fp32" or key in m.golden.artifacts
        want, tol = m.golden.expected(key)  # its own recorded logits, else the PyTorch ones
        want = np.asarray(want, np.float64)
        diff = float(np.abs(got - want).max()) if got.size else 0.0
        agree = float((got.argmax(1) == want.argmax(1)).mean()) if got.size else 1.0
        ok = (diff <= tol and agree == 1.0) if strict else True
        results[key] = {"max_abs_logit_diff": diff, "agreement": agree, "strict": strict, "passed": ok}
        if not strict and got.size:
            outputs[key] = GoldenOutputs(logits=got.round(7).tolist(), atol=max(atol, diff))
        if not ok:
            failures.append(f"{key} ({art.file}): max |Δlogit| {diff:.3g} vs atol {tol:.3g}, "
                            f"top-1 agreement {agree:.0%} on {len(paths)} golden images")
    return {"checked": True, "images": len(paths), "artifacts": results, "failures": failures, "outputs": outputs}
