"""One way to silence third-party output during an export step.

The ONNX exporter, onnxslim, onnxruntime's quantizer and its FP16 converter print
progress, warnings and per-tensor log lines of their own; the CLI's output stays ours.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def quiet(*loggers: str, root_logger: bool = False) -> Iterator[None]:
    """Swallow stdout/stderr and warnings; raise the named loggers (and the root logger when
    `root_logger`, for libraries that log through it) to ERROR for the duration."""
    names = [*loggers, *([""] if root_logger else [])]
    saved = [(logging.getLogger(n or None), logging.getLogger(n or None).level) for n in names]
    for lg, _ in saved:
        lg.setLevel(logging.ERROR)
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)


@contextlib.contextmanager
def logger_at(name: str, level: int = logging.WARNING) -> Iterator[None]:
    """Raise one logger to `level` for the duration; output, warnings and other loggers untouched. The
    export opens each artifact's runtime session several times (parity on every backend, then the deploy
    timing) and the runtime's one-line "model on backend" note per session, useful to `edgekiln
    predict`, was 36 lines of a photo-set run's output."""
    lg = logging.getLogger(name)
    saved = lg.level
    lg.setLevel(max(level, lg.getEffectiveLevel()))
    try:
        yield
    finally:
        lg.setLevel(saved)
