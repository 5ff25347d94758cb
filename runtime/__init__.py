"""edgekiln's embedded inference runtime: numpy + PIL + onnxruntime, never torch.

    import runtime
    clf = runtime.load("runs/demo/bundle")
    for p in clf.predict(["a.png", "b.png"], top_k=3):
        print(p.label, p.probability)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtime.bundle import Bundle, read_bundle
from runtime.errors import BundleError, EdgekilnError, ImageError
from runtime.preprocess import as_image_list, preprocess

__all__ = ["load", "Classifier", "Prediction", "BundleError", "EdgekilnError", "ImageError"]

log = logging.getLogger("edgekiln.runtime")

_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


@dataclass(frozen=True)
class Prediction:
    label: str
    index: int
    probability: float
    top_k: list[tuple[str, float]] = field(default_factory=list)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class Classifier:
    """An image classifier loaded from a bundle directory."""

    def __init__(self, bundle: Bundle, backend: str = "cpu", intra_op_threads: int | None = None, max_batch: int = 64):
        import onnxruntime as ort

        if backend not in _PROVIDERS:
            raise EdgekilnError(f"unknown backend '{backend}'; valid: {', '.join(_PROVIDERS)}")
        provider = _PROVIDERS[backend]
        available = ort.get_available_providers()
        if provider not in available:
            # Explicit hardware: never fall back silently to another provider.
            raise EdgekilnError(
                f"backend '{backend}' needs onnxruntime's {provider}, which this install lacks "
                f"(available: {', '.join(available)})"
            )
        self.bundle = bundle
        self.spec = bundle.preprocess
        self.class_names = bundle.class_names
        self.max_batch = max_batch
        opts = ort.SessionOptions()
        if intra_op_threads:
            opts.intra_op_num_threads = intra_op_threads
        model_path = bundle.path("onnx")
        try:
            self.session = ort.InferenceSession(str(model_path), sess_options=opts, providers=[provider])
        except Exception as e:  # onnxruntime raises its own untyped errors for bad models
            raise BundleError(f"{model_path}: onnxruntime cannot load it ({e})") from None
        self.backend = backend
        log.info("edgekiln runtime: %s on %s", model_path.name, self.session.get_providers()[0])

    def logits(self, inputs: Any) -> np.ndarray:
        """Raw logits, shape (N, num_classes), for one image or many."""
        images = as_image_list(inputs)
        if not images:
            return np.zeros((0, len(self.class_names)), dtype=np.float32)
        outs = []
        for i in range(0, len(images), self.max_batch):
            batch = preprocess(images[i : i + self.max_batch], self.spec)
            outs.append(self.run(batch))
        return np.concatenate(outs, axis=0)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Run the model on an already preprocessed float32 NCHW batch."""
        return self.session.run([self.bundle.output_name], {self.bundle.input_name: batch})[0]

    def predict(self, inputs: Any, top_k: int = 1) -> list[Prediction]:
        """Labels with probabilities for one image or many (paths, PIL images, bytes or uint8 arrays)."""
        probs = softmax(self.logits(inputs))
        k = max(1, min(top_k, probs.shape[1]))
        preds = []
        for p in probs:
            order = np.argsort(-p, kind="stable")[:k]
            preds.append(
                Prediction(
                    label=self.class_names[int(order[0])],
                    index=int(order[0]),
                    probability=float(p[order[0]]),
                    top_k=[(self.class_names[int(j)], float(p[j])) for j in order],
                )
            )
        return preds


def load(bundle_dir: str | Path, backend: str = "cpu", intra_op_threads: int | None = None) -> Classifier:
    """Load and verify a bundle (sha256 of every file) and return a Classifier."""
    return Classifier(read_bundle(bundle_dir, verify=True), backend=backend, intra_op_threads=intra_op_threads)
