"""What `edgekiln serve` configures, validated once here."""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict, Field

from runtime.errors import EdgekilnError
from runtime.preprocess import MAX_PIXELS

# `--workers N`: each uvicorn worker process reads its settings from here (JSON).
SETTINGS_ENV = "EDGEKILN_SERVE_SETTINGS"


class ServeSettings(BaseModel):
    """Everything `edgekiln serve` configures (validated once, here)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bundle_dir: str
    backend: str = "auto"
    allow_engine_fallback: bool = False  # backend tensorrt-engine: serve the ONNX model, warned, if the engine can't run
    model_name: str = Field("edgekiln", pattern=r"^[A-Za-z0-9_.-]+$")
    intra_op_threads: int | None = Field(None, ge=1)
    max_batch: int = Field(32, ge=1, le=1024)
    max_delay_ms: float = Field(5.0, ge=0, le=10_000)
    max_queue: int = Field(256, ge=1)
    max_body_bytes: int = Field(32 * 2**20, ge=1024)
    max_pixels: int = Field(MAX_PIXELS, ge=1)
    max_images_per_request: int = Field(64, ge=1)
    request_timeout_s: float = Field(30.0, gt=0)
    self_test: bool | None = None  # None: run it when the bundle has golden images
    artifact: str | None = None  # the bundle artifact served (onnx, onnx_int8, openvino, ...); None: its default
    public_key: str | None = None  # refuse a bundle without a valid signature by this Ed25519 key (runtime.signing)
    ood: bool = True  # /v1/classify answers "unknown" below the bundle's OOD threshold (per request: ?ood=false)
    # backend openvino (runtime.backends.OpenVINOOptions; None: $EDGEKILN_OPENVINO_*, then its defaults)
    openvino_device: str | None = None
    openvino_precision: str | None = None
    openvino_hint: str | None = None
    openvino_streams: int | None = Field(None, ge=1)

    def backend_options(self):
        """The backend's own options (OpenVINOOptions for backend openvino), else None."""
        if self.backend != "openvino":
            return None
        from runtime.backends.openvino import OpenVINOOptions

        return OpenVINOOptions(device=self.openvino_device, precision=self.openvino_precision,
                               hint=self.openvino_hint, streams=self.openvino_streams)


def settings_to_env(settings: ServeSettings) -> None:
    os.environ[SETTINGS_ENV] = settings.model_dump_json()


def settings_from_env() -> ServeSettings:
    raw = os.environ.get(SETTINGS_ENV)
    if not raw:
        raise EdgekilnError(f"${SETTINGS_ENV} is not set; start the server with `edgekiln serve BUNDLE`")
    return ServeSettings.model_validate_json(raw)
