"""Re-export of the shared error types (defined torch-free in runtime.errors)."""

from runtime.errors import (  # noqa: F401
    BundleError,
    ConfigError,
    DataError,
    EdgekilnError,
    ImageError,
    ModelError,
    ParityError,
)
