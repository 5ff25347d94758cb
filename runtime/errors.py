"""Errors shared by every edgekiln package. Lives in runtime/ because the
runtime must not import the training side; pipeline/ re-exports these."""


class EdgekilnError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits non-zero."""

    exit_code = 1


class ConfigError(EdgekilnError):
    exit_code = 2


class DataError(EdgekilnError):
    pass


class ModelError(EdgekilnError):
    pass


class BundleError(EdgekilnError):
    """A bundle is missing, malformed or has been tampered with."""


class ImageError(EdgekilnError):
    """An input image cannot be decoded."""


class ParityError(EdgekilnError):
    """An exported artifact disagrees with the PyTorch model beyond the thresholds."""


class ImageTooLargeError(ImageError):
    """An image has more pixels than allowed (a decompression bomb guard)."""


class BackendError(EdgekilnError):
    """An inference backend was asked for that this machine or install cannot provide."""
