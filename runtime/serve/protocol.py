"""The Open Inference Protocol v2 (KServe / Triton REST), written down once as pydantic models.

https://kserve.github.io/website/docs/concepts/architecture/data-plane/v2-protocol
Triton's binary tensor extension: the JSON header is followed by raw tensor bytes, its length in
the Inference-Header-Content-Length header, each binary tensor's size in its
`parameters.binary_data_size`
(https://github.com/triton-inference-server/server/blob/main/docs/protocol/extension_binary_data.md).
Errors are JSON `{"error": "..."}` (ApiError), the protocol's error shape.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, StrictInt, ValidationError

HEADER_LEN = "inference-header-content-length"  # Triton binary tensor extension
_DTYPES = {"FP32": np.dtype("<f4")}


class ApiError(Exception):
    """An error answered as JSON {"error": message} with `status`."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def validation_message(errors: list[dict]) -> str:
    """pydantic's errors as one line: 'bad request: inputs.0.shape.1: Input should be a valid integer'."""
    return "bad request: " + "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in errors)


# ------------------------------------------------------------------ requests


class RequestInput(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    shape: list[StrictInt]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: Any = None  # a flat or nested list of numbers; absent with the binary extension


class RequestOutput(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    parameters: dict[str, Any] | None = None


class InferenceRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str | int | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


@dataclass
class InferRequest:
    """A checked infer request: the float32 NCHW batch and how to answer (`outputs`: the names asked
    for, None = every output of the model)."""

    x: np.ndarray
    id: str | None
    binary_output: bool
    outputs: list[str] | None = None


@dataclass(frozen=True)
class ModelSignature:
    """What a request must match: tensor names, one image's (C, H, W), rows allowed per request;
    `score_name`: the extra output carrying the OOD score (runtime.trust), when the bundle has one;
    `label_names`: a multilabel bundle's extra outputs (the sigmoid probabilities, the label set as 0/1)."""

    input_name: str
    output_name: str
    chw: tuple[int, int, int]
    max_rows: int
    score_name: str | None = None
    label_names: tuple[str, ...] = ()

    @property
    def output_names(self) -> list[str]:
        return [self.output_name] + ([self.score_name] if self.score_name else []) + list(self.label_names)


def split_binary(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON header, binary tensor data) of a request body."""
    if header_length is None:
        return body, b""
    try:
        n = int(header_length)
    except ValueError:
        raise ApiError(400, f"Inference-Header-Content-Length must be an integer, got '{header_length}'") from None
    if not 0 <= n <= len(body):
        raise ApiError(400, f"Inference-Header-Content-Length {n} is outside the body ({len(body)} bytes)")
    return body[:n], body[n:]


def _check_shape(t: RequestInput, sig: ModelSignature) -> int:
    """The element count of a well-shaped input tensor; ApiError otherwise."""
    name, shape, chw = sig.input_name, t.shape, sig.chw
    if t.name != name:
        raise ApiError(400, f"unknown input '{t.name}'; this model's input is '{name}'")
    if t.datatype not in _DTYPES:
        raise ApiError(400, f"input '{name}': datatype {t.datatype!r} is not supported; expected 'FP32'")
    expected = f"[batch, {chw[0]}, {chw[1]}, {chw[2]}]"
    if len(shape) != 4:
        raise ApiError(400, f"input '{name}': shape {shape} is not {expected}")
    if tuple(shape[1:]) != chw or shape[0] < 1:
        raise ApiError(400, f"input '{name}': shape {shape} does not match the model's {expected} "
                            "(images preprocessed as bundle.json's 'preprocess' section says)")
    if shape[0] > sig.max_rows:
        raise ApiError(413, f"input '{name}': batch of {shape[0]} exceeds the limit of {sig.max_rows} per request")
    return math.prod(shape)


def _tensor(t: RequestInput, binary: bytes, sig: ModelSignature) -> np.ndarray:
    """The input tensor's values, from the binary data or its JSON 'data'."""
    count, name, shape = _check_shape(t, sig), sig.input_name, t.shape
    params = t.parameters or {}
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if not isinstance(size, int) or size != len(binary):
            raise ApiError(400, f"input '{name}': binary_data_size {size!r} but {len(binary)} bytes follow the JSON header")
        if size != count * 4:
            raise ApiError(400, f"input '{name}': {size} bytes of binary data for shape {shape} (FP32 needs {count * 4})")
        x = np.frombuffer(binary, dtype=_DTYPES[t.datatype]).reshape(shape)
    else:
        if binary:
            raise ApiError(400, "binary data follows the JSON header but no input declares 'binary_data_size'")
        if t.data is None:
            raise ApiError(400, f"input '{name}' has no 'data'")
        try:
            x = np.asarray(t.data, dtype=np.float32)
        except (ValueError, TypeError):
            raise ApiError(400, f"input '{name}': 'data' must be a flat or nested list of {count} numbers") from None
        if x.size != count:
            raise ApiError(400, f"input '{name}': 'data' holds {x.size} values but shape {shape} needs {count}")
        x = x.reshape(shape)
    if not np.isfinite(x).all():
        raise ApiError(400, f"input '{name}': data holds NaN or infinite values")
    return np.ascontiguousarray(x, dtype=np.float32)


def parse_infer_request(body: bytes, header_length: str | None, sig: ModelSignature) -> InferRequest:
    """Validate a v2 infer request (JSON, or JSON + binary tensors) into a float32 NCHW array."""
    head, binary = split_binary(body, header_length)
    try:
        raw = json.loads(head)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"malformed JSON in the request body: {e}") from None
    if not isinstance(raw, dict):
        raise ApiError(400, "the request body must be a JSON object with an 'inputs' list")
    try:
        req = InferenceRequest.model_validate(raw)
    except ValidationError as e:
        raise ApiError(400, validation_message(e.errors(include_url=False))) from None
    if len(req.inputs) != 1:
        raise ApiError(400, f"'inputs' must be a list holding exactly one tensor, '{sig.input_name}'")
    x = _tensor(req.inputs[0], binary, sig)
    binary_output = bool((req.parameters or {}).get("binary_data_output", False))
    for o in req.outputs or ():
        if o.name not in sig.output_names:
            raise ApiError(400, f"unknown output '{o.name}'; this model's outputs are {', '.join(sig.output_names)}")
        if (o.parameters or {}).get("binary_data"):
            binary_output = True
    names = [o.name for o in req.outputs] if req.outputs else None
    return InferRequest(x, None if req.id is None else str(req.id), binary_output, names)


# ----------------------------------------------------------------- responses


class ResponseOutput(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] | None = None
    data: list[float] | None = None


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    outputs: list[ResponseOutput]
    id: str | None = None


def encode_infer_response(tensors: list[tuple[str, np.ndarray]], model_name: str, request_id: str | None,
                          binary_output: bool) -> tuple[bytes, int | None]:
    """The response body with each (name, FP32 array) output, and the JSON header's length when the
    outputs follow it as binary data (in order)."""
    arrays = [np.ascontiguousarray(y, dtype=np.float32) for _, y in tensors]
    outs = [ResponseOutput.model_construct(name=name, datatype="FP32", shape=list(y.shape))
            for (name, _), y in zip(tensors, arrays)]
    resp = InferenceResponse.model_construct(model_name=model_name, model_version="1", outputs=outs, id=request_id)
    if not binary_output:
        for out, y in zip(outs, arrays):
            out.data = y.ravel().tolist()
        return resp.model_dump_json(exclude_none=True).encode(), None
    raws = [y.astype("<f4", copy=False).tobytes() for y in arrays]  # already float32: no copy on little-endian hosts
    for out, raw in zip(outs, raws):
        out.parameters = {"binary_data_size": len(raw)}
    head = resp.model_dump_json(exclude_none=True).encode()
    return head + b"".join(raws), len(head)


class MetadataTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadataResponse(BaseModel):
    name: str
    versions: list[str]
    platform: str  # Triton's platform names: onnxruntime_onnx, tensorrt_plan
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]
    parameters: dict[str, Any]


class ServerMetadataResponse(BaseModel):
    name: str
    version: str
    extensions: list[str]
