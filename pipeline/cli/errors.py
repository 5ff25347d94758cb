"""How every edgekiln command reports failure: one line on stderr and an exit code, never a traceback."""

from __future__ import annotations

import functools
import sys

import click

from runtime.errors import EdgekilnError


def fail(msg: str, code: int) -> None:
    """Print `error: msg` on stderr and exit with `code`."""
    click.echo(f"error: {msg}" if "\n" not in msg else "error:\n" + msg, err=True)
    sys.exit(code)


def handle_errors(fn):
    """Domain errors -> one line on stderr and their exit code; never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EdgekilnError as e:
            fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except MemoryError:
            fail("out of memory: lower data.batch_size or model.input_size", 1)
        except OSError as e:  # disk full, permissions, ...: the OS message names the file
            fail(f"{e.strerror or e}{': ' + str(e.filename) if e.filename else ''}", 1)

    return wrapper
