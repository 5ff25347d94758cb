"""edgekiln's embedded inference runtime: numpy + PIL + onnxruntime, never torch.

    import runtime
    clf = runtime.load("runs/demo/bundle")              # backend: cpu | cuda | tensorrt | tensorrt-engine | openvino | auto
    for p in clf.predict(["a.png", "b.png"], top_k=3):
        print(p.label, p.probability)
    clf.self_test()                                      # the bundle's golden images -> expected logits
    clf.artifact                                         # the bundle's default artifact unless one was named
    runtime.load("runs/demo/bundle", public_key="edgekiln.pub")   # refuses an unsigned or badly signed bundle

Probabilities are calibrated and a prediction may be "unknown" (`p.known` False, `p.score` below the
bundle's threshold) when bundle.json has a `trust` section (runtime.trust); `ood=False` turns that off.
A multilabel bundle (bundle.json `task: multilabel`) answers `MultiLabelPrediction`s instead: the label
set (every label whose sigmoid probability reaches its threshold) and every label's probability.

Backends live in runtime.backends (a named backend that cannot run is an
error, never a fallback — except that `tensorrt-engine` may run the bundle's
ONNX model, with a warning, when the caller passes allow_engine_fallback=True);
the HTTP server in runtime.serve (docs/deploy.md).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtime.backends import backend_names, create_session
from runtime.backends.base import check_parity_on
from runtime.bundle import Bundle, read_bundle
from runtime.errors import BackendError, BundleError, EdgekilnError, ImageError, ImageTooLargeError, ParityError
from runtime.preprocess import MAX_PIXELS, as_image_list, preprocess
from runtime.signing import PUBLIC_KEY_ENV
from runtime.trust import Outputs, postprocess, softmax  # noqa: F401  (runtime.softmax, as before)

__all__ = [
    "load", "Classifier", "MultiLabelPrediction", "Prediction", "SelfTestReport", "backend_names",
    "BackendError", "BundleError", "EdgekilnError", "ImageError", "ImageTooLargeError", "ParityError",
]

log = logging.getLogger("edgekiln.runtime")


@dataclass(frozen=True)
class Prediction:
    """One image's answer. `label` is the best class, or the bundle's unknown label (default "unknown")
    when its OOD `score` is below the threshold (`known` False); `index` and `top_k` always name the
    classes, with calibrated probabilities. `score` is None when the bundle has no OOD section."""

    label: str
    index: int
    probability: float
    top_k: list[tuple[str, float]] = field(default_factory=list)
    known: bool = True
    score: float | None = None


@dataclass(frozen=True)
class MultiLabelPrediction:
    """One image's answer from a multilabel bundle: `labels`, the label set (every label whose
    probability reaches its threshold, best first; may be empty), and `probabilities`, the sigmoid
    probability of every label (class order)."""

    labels: list[str]
    probabilities: dict[str, float]

    @property
    def indices(self) -> list[int]:
        names = list(self.probabilities)
        return [names.index(lab) for lab in self.labels]


@dataclass(frozen=True)
class SelfTestReport:
    """What `Classifier.self_test()` measured on the bundle's golden images."""

    backend: str
    n_images: int
    max_abs_diff: float
    atol: float
    labels_agree: bool

    @property
    def passed(self) -> bool:
        return self.labels_agree and self.max_abs_diff <= self.atol


class Classifier:
    """An image classifier loaded from a bundle directory."""

    def __init__(self, bundle: Bundle, backend: str = "cpu", intra_op_threads: int | None = None, max_batch: int = 64,
                 artifact: str | None = None, max_pixels: int | None = MAX_PIXELS, device_id: int = 0,
                 allow_engine_fallback: bool = False, backend_options: Any = None, ood: bool = True):
        self.bundle = bundle
        self.trust = bundle.manifest.trust
        self.multilabel = bundle.manifest.multilabel  # per-label thresholds (task multilabel), else None
        self.ood = ood  # answer "unknown" below the bundle's OOD threshold (when it has one)
        self.spec = bundle.preprocess
        self.class_names = bundle.class_names
        self.max_batch = max_batch
        self.max_pixels = max_pixels
        self.artifact = artifact or default_artifact(bundle, backend)
        check_parity_on(bundle, self.artifact, backend)  # the parity gate, bench and deploy open it regardless
        self.session = create_session(backend, bundle, artifact=self.artifact, intra_op_threads=intra_op_threads,
                                      device_id=device_id, allow_engine_fallback=allow_engine_fallback,
                                      options=backend_options)
        self.backend = self.session.backend  # what `auto` (or an allowed engine fallback) resolved to
        self.provider = self.session.provider

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one preprocessed image."""
        return (3, *self.spec.hw)

    def preprocess(self, inputs: Any) -> np.ndarray:
        """Decode and preprocess one image or many into a float32 NCHW batch."""
        return preprocess(as_image_list(inputs), self.spec, max_pixels=self.max_pixels)

    def logits(self, inputs: Any) -> np.ndarray:
        """Raw logits, shape (N, num_classes), for one image or many."""
        images = as_image_list(inputs)
        if not images:
            return np.zeros((0, len(self.class_names)), dtype=np.float32)
        outs = []
        for i in range(0, len(images), self.max_batch):
            batch = preprocess(images[i : i + self.max_batch], self.spec, max_pixels=self.max_pixels)
            outs.append(self.run(batch))
        return np.concatenate(outs, axis=0)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Run the model on an already preprocessed float32 NCHW batch."""
        return self.session.run(batch)

    def predict(self, inputs: Any, top_k: int = 1, ood: bool | None = None) -> list[Prediction] | list[MultiLabelPrediction]:
        """Labels with probabilities for one image or many (paths, PIL images, bytes or uint8 arrays).
        ood: answer "unknown" below the bundle's OOD threshold (None: as loaded). A multilabel bundle
        answers MultiLabelPredictions (top_k and ood do not apply)."""
        return self.predictions_from_logits(self.logits(inputs), top_k, ood=ood)

    def outputs(self, logits: np.ndarray, ood: bool | None = None) -> Outputs:
        """Calibrated probabilities, OOD scores and known/unknown for raw logits (runtime.trust.postprocess)."""
        return postprocess(logits, self.trust, ood=self.ood if ood is None else ood)

    @property
    def unknown_label(self) -> str | None:
        return self.trust.ood.unknown_label if self.trust and self.trust.ood else None

    def predictions_from_logits(self, logits: np.ndarray, top_k: int = 1,
                                ood: bool | None = None) -> list[Prediction] | list[MultiLabelPrediction]:
        if self.multilabel is not None:
            return self.label_sets(logits)
        out = self.outputs(logits, ood=ood)
        k = max(1, min(top_k, out.probs.shape[1]))
        preds = []
        for i, p in enumerate(out.probs):
            order = np.argsort(-p, kind="stable")[:k]
            known = bool(out.known[i])
            preds.append(
                Prediction(
                    label=self.class_names[int(order[0])] if known else self.unknown_label,
                    index=int(order[0]),
                    probability=float(p[order[0]]),
                    top_k=[(self.class_names[int(j)], float(p[j])) for j in order],
                    known=known,
                    score=None if out.score is None else float(out.score[i]),
                )
            )
        return preds

    def label_sets(self, logits: np.ndarray) -> list[MultiLabelPrediction]:
        """A multilabel bundle's answers for raw logits (runtime.multilabel.decide with its thresholds)."""
        from runtime.multilabel import decide

        probs, chosen = decide(logits, self.multilabel.thresholds)
        out = []
        for p, c in zip(probs, chosen):
            picked = sorted(np.nonzero(c)[0], key=lambda j: -p[j])
            out.append(MultiLabelPrediction(labels=[self.class_names[int(j)] for j in picked],
                                            probabilities={n: float(v) for n, v in zip(self.class_names, p)}))
        return out

    def self_test(self) -> SelfTestReport:
        """Check this backend against the bundle's golden images and their expected logits.

        bundle.json's "golden" section: {"files": [names inside the bundle],
        "logits": [[...], ...], "atol": float, "artifacts": {key: {"logits", "atol"}}}: an FP32
        artifact is held to the PyTorch logits, an INT8/FP16 one to its own export-time logits.
        Raises BundleError when the bundle has none (or it is malformed) and ParityError when the
        logits differ by more than atol or a top-1 label differs.
        """
        root = self.bundle.root
        files, paths, expected, atol = self.bundle.golden(self.artifact)
        expected = expected.astype(np.float32)
        got = self.logits(paths)
        diff = np.abs(got - expected).max(axis=1)
        agree = got.argmax(axis=1) == expected.argmax(axis=1)
        report = SelfTestReport(self.backend, len(files), float(diff.max()), atol, bool(agree.all()))
        if not report.passed:
            worst = int(diff.argmax())
            flipped = [files[i] for i in np.nonzero(~agree)[0]]
            raise ParityError(
                f"{root}: self-test failed on backend '{self.backend}' ({self.artifact}): "
                f"max |Δlogit| {report.max_abs_diff:.2e} (atol {atol:.0e}, worst image {files[worst]})"
                + (f", top-1 label differs on {', '.join(flipped)}" if flipped else "")
            )
        log.info("edgekiln runtime: self-test passed on %d golden images (max |Δlogit| %.2e ≤ %.0e, backend %s)",
                 report.n_images, report.max_abs_diff, atol, self.backend)
        return report


def default_artifact(bundle: Bundle, backend: str) -> str:
    """The artifact to open when the caller names none: bundle.json's `default_artifact` (export's
    measured choice) when it runs on `backend` (or backend is auto), else the FP32 ONNX model."""
    m = bundle.manifest
    key = m.default_artifact
    if backend in ("auto", *m.artifacts[key].runtimes) or "onnx" not in m.artifacts:
        return key
    log.info("edgekiln runtime: the default artifact '%s' does not run on backend '%s'; opening 'onnx'", key, backend)
    return "onnx"


def load(bundle_dir: str | Path, backend: str = "cpu", intra_op_threads: int | None = None, *,
         artifact: str | None = None, max_batch: int = 64, max_pixels: int | None = MAX_PIXELS,
         device_id: int = 0, allow_engine_fallback: bool = False, backend_options: Any = None,
         public_key: str | Path | None = None, ood: bool = True) -> Classifier:
    """Load and verify a bundle (sha256 of every file) and return a Classifier.

    public_key: an Ed25519 public key (PEM file, `edgekiln keygen`; default $EDGEKILN_PUBLIC_KEY): the
    bundle must carry a valid signature by it (`edgekiln sign`) over bundle.json, which pins every
    file's sha256; an unsigned bundle or a bad signature raises BundleError.
    ood: answer "unknown" below the bundle's OOD threshold (runtime.trust); False turns it off.

    artifact: a key of bundle.json's "artifacts" (onnx, onnx_int8, ...); None opens the bundle's
    `default_artifact`, the deployable export chose by measurement (`auto` then picks the best
    backend this machine has for it; bundle.json's `default_backend` only records where it was measured).

    backend: 'cpu', 'cuda', 'tensorrt', 'tensorrt-engine' (the bundle's native
    TensorRT engine, refused unless its fingerprint matches this GPU) or 'auto'
    (the best that starts here, logged). A backend named explicitly that cannot
    run here raises BackendError listing the available providers; it never falls
    back — except that with allow_engine_fallback=True (or
    $EDGEKILN_ALLOW_ENGINE_FALLBACK=1) 'tensorrt-engine' runs the bundle's ONNX
    model on the best onnxruntime backend, with a WARNING naming the reason.
    'openvino' runs the ONNX or OpenVINO IR artifact (backend_options: runtime.backends.OpenVINOOptions).
    """
    public_key = public_key or os.environ.get(PUBLIC_KEY_ENV) or None
    return Classifier(read_bundle(bundle_dir, verify=True, public_key=public_key), backend=backend,
                      intra_op_threads=intra_op_threads, max_batch=max_batch, artifact=artifact,
                      max_pixels=max_pixels, device_id=device_id, allow_engine_fallback=allow_engine_fallback,
                      backend_options=backend_options, ood=ood)
