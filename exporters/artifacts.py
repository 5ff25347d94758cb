"""Every artifact of a bundle, built from one checkpoint, and the parity gate
that checks each of them against PyTorch, label by label.

    bundle.json "artifacts":
      onnx        model.onnx        fp32   (always)
      onnx_fp16   model.fp16.onnx   fp16   (export.precisions)
      onnx_int8   model.int8.onnx   int8   (export.precisions; QDQ, accuracy-guarded)
      tensorrt    model.plan        fp32|fp16|int8 (export.tensorrt.enabled; fingerprinted)
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np

from exporters.parity import GateResult, Thresholds, artifact_runner, compare_logits
from exporters.specs import ExportSpec

log = logging.getLogger("edgekiln")

FILES = {"onnx": "model.onnx", "onnx_fp16": "model.fp16.onnx", "onnx_int8": "model.int8.onnx", "tensorrt": "model.plan"}


def resolve_thresholds(vcfg, precision: str, spec: type[ExportSpec] = ExportSpec) -> Thresholds:
    """The config's `validate` thresholds for `precision`, the architecture spec's where the config says None."""
    tol = spec.tolerances[precision]
    if precision == "fp32":
        return Thresholds(min_agreement=vcfg.min_agreement, max_abs_logit_diff=vcfg.max_abs_logit_diff,
                          min_accuracy=vcfg.min_accuracy, max_accuracy_drop=tol.max_accuracy_drop, max_kl=tol.max_kl)
    p = getattr(vcfg, precision)

    def pick(name: str):
        v = getattr(p, name)
        return v if v is not None else getattr(tol, name)

    return Thresholds(
        min_agreement=pick("min_agreement"),
        max_abs_logit_diff=pick("max_abs_logit_diff"),
        max_accuracy_drop=pick("max_accuracy_drop"),
        max_kl=pick("max_kl"),
        min_accuracy=p.min_accuracy if p.min_accuracy is not None else vcfg.min_accuracy,
    )


def parity_gate(
    bundle_dir: Path,
    meta: dict[str, Any],
    reference: np.ndarray,
    labels: np.ndarray,
    paths: list[Path],
    names: list[str],
    thresholds_for: Callable[[str], Thresholds],
    onnx_run: Callable[[np.ndarray], np.ndarray] | None = None,
    batch: int = 64,
) -> GateResult:
    """Check every artifact in `meta["artifacts"]` against the PyTorch `reference` logits on `paths`.

    `onnx_run` (the runtime Classifier's `run`) runs the FP32 model when given, so the artifact
    the runtime serves by default is checked through the runtime itself. The images are decoded
    and preprocessed once per chunk (bundle.json's preprocessing) and fed to every artifact, and
    the golden-image self-test reuses the same runners (sessions and engines load once).
    """
    from exporters.golden import self_test
    from exporters.tensorrt import TensorRTUnavailable
    from runtime.preprocess import PreprocessSpec, preprocess

    runners: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
    for key in meta["artifacts"]:
        if key == "onnx" and onnx_run is not None:
            runners[key] = onnx_run
            continue
        try:
            runners[key] = artifact_runner(Path(bundle_dir), meta, key)
        except (ImportError, TensorRTUnavailable) as e:  # e.g. a TensorRT engine on a machine without tensorrt
            log.warning("parity: %s not checked on this machine: %s", key, e)
    spec = PreprocessSpec.from_dict(meta["preprocess"])
    outs: dict[str, list[np.ndarray]] = {k: [] for k in runners}
    for i in range(0, len(paths), batch):
        x = preprocess(paths[i : i + batch], spec)
        for key, run in runners.items():
            outs[key].append(np.asarray(run(x), dtype=np.float32))
    reports = {}
    for key, chunks in outs.items():
        art = meta["artifacts"][key]
        cand = np.concatenate(chunks) if chunks else np.zeros((0, len(meta["class_names"])), np.float32)
        precision = art.get("precision", "fp32")
        reports[key] = compare_logits(art["file"], reference, cand, labels, thresholds_for(precision), names,
                                      precision=precision, class_names=meta.get("class_names"))
    golden = self_test(Path(bundle_dir), meta, runners=runners) if meta.get("golden") else {}
    return GateResult(reports=reports, golden=golden)
