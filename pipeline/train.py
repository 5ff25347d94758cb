"""Transitional: the training code lives in pipeline.training; these names are re-exported for
modules not yet switched to it."""

from pipeline.training import accuracy, predict_logits, set_seed, train_device  # noqa: F401
