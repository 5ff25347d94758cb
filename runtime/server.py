"""edgekiln's HTTP server: the Open Inference Protocol v2 plus an image endpoint.

    edgekiln serve runs/demo/bundle --port 8000 --max-batch 32 --max-delay-ms 5

Endpoints (KServe / Triton "v2" REST protocol, so tritonclient and KServe
clients work unchanged; https://kserve.github.io/website/docs/concepts/architecture/data-plane/v2-protocol):

    GET  /v2/health/live, /v2/health/ready
    GET  /v2                                   server metadata
    GET  /v2/models/{name}[/versions/1]        model metadata (input FP32 [-1,3,H,W], output FP32 [-1,classes])
    GET  /v2/models/{name}[/versions/1]/ready
    POST /v2/models/{name}[/versions/1]/infer  JSON tensors, or Triton's binary tensor extension
    POST /v1/classify?top_k=3                  encoded images (multipart files or raw bytes) -> labels + probabilities
    GET  /metrics                              Prometheus

Concurrent requests are merged by a DynamicBatcher into one onnxruntime call
of up to `max_batch` images, waiting at most `max_delay_ms` after the first
one arrived; the model runs in one worker thread so the event loop stays free.
Errors are JSON `{"error": "..."}` (the v2 protocol's error shape).

The model loads in the FastAPI lifespan, never at import, and nothing here
imports torch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route

from runtime.errors import EdgekilnError, ImageError, ImageTooLargeError
from runtime.preprocess import MAX_PIXELS

log = logging.getLogger("edgekiln.server")

SETTINGS_ENV = "EDGEKILN_SERVE_SETTINGS"
HEADER_LEN = "inference-header-content-length"  # Triton binary tensor extension


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


class ApiError(Exception):
    """An error answered as JSON {"error": message} with `status`."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


# ----------------------------------------------------------------- metrics


class Metrics:
    """Prometheus metrics in a registry of their own (one per app, so tests can build many)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("edgekiln_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "code"], registry=self.registry)
        self.latency = Histogram("edgekiln_request_latency_seconds", "HTTP request latency by endpoint", ["endpoint"],
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30),
                                 registry=self.registry)
        self.batch_size = Histogram("edgekiln_batch_size", "Images per model call (dynamic batching)",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), registry=self.registry)
        self.inference = Histogram("edgekiln_inference_seconds", "Model call duration",
                                   buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5),
                                   registry=self.registry)
        self.queue_depth = Gauge("edgekiln_queue_depth", "Requests waiting for the model", registry=self.registry)
        self.images = Counter("edgekiln_images", "Images (tensor rows) inferred", registry=self.registry)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def endpoint_label(path: str) -> str:
    """A bounded set of label values (paths hold model names)."""
    if path.startswith("/v2/models/"):
        if path.endswith("/infer"):
            return "infer"
        return "model_ready" if path.endswith("/ready") else "model_metadata"
    if path.startswith("/v2/health/"):
        return "health"
    return {"/v1/classify": "classify", "/metrics": "metrics", "/v2": "server_metadata"}.get(path, "other")


# ---------------------------------------------------------------- batching


@dataclass
class _Item:
    x: np.ndarray
    future: asyncio.Future
    t_enqueued: float


class DynamicBatcher:
    """Merges concurrent requests into one model call.

    A batch is dispatched when it holds `max_batch` rows, or `max_delay_s`
    after its first request arrived, whichever comes first; while the model
    runs, new requests queue up and form the next batch. The queue holds at
    most `max_queue` requests: `submit` raises ApiError(503) beyond that.
    """

    def __init__(self, run_fn, max_batch: int, max_delay_s: float, max_queue: int, metrics: Metrics):
        self.run_fn = run_fn
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.metrics = metrics
        self._items: deque[_Item] = deque()
        self._rows = 0  # image rows in _items
        self._wakeup = asyncio.Event()
        self._closing = False
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="edgekiln-infer")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="edgekiln-batcher")

    @property
    def depth(self) -> int:
        return len(self._items)

    async def submit(self, x: np.ndarray) -> np.ndarray:
        if self._closing:
            raise ApiError(503, "server is shutting down", {"Retry-After": "1"})
        if len(self._items) >= self.max_queue:
            raise ApiError(503, f"server busy: {len(self._items)} requests already queued (limit {self.max_queue}); "
                                "retry later", {"Retry-After": "1"})
        loop = asyncio.get_running_loop()
        item = _Item(x, loop.create_future(), loop.time())
        self._items.append(item)
        self._rows += len(x)
        self.metrics.queue_depth.set(len(self._items))
        # Wake the batcher only when it has something to act on: the first request (it idles on an
        # empty queue) or a full batch. Waking it for every request in between, only for it to go
        # back to waiting on the deadline, cost a wait_for (a task and a timer) per request.
        if len(self._items) == 1 or self._rows >= self.max_batch:
            self._wakeup.set()
        return await item.future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._items:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            deadline = self._items[0].t_enqueued + self.max_delay_s
            while not self._closing and self._rows < self.max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), timeout)
                except asyncio.TimeoutError:
                    break
            batch: list[_Item] = []
            rows = 0
            while self._items and (not batch or rows + len(self._items[0].x) <= self.max_batch):
                it = self._items.popleft()
                self._rows -= len(it.x)
                if it.future.done():  # its request timed out or its client went away
                    continue
                batch.append(it)
                rows += len(it.x)
            self.metrics.queue_depth.set(len(self._items))
            if batch:
                await self._run(batch, rows)

    async def _run(self, batch: list[_Item], rows: int) -> None:
        t0 = time.perf_counter()
        try:
            x = batch[0].x if len(batch) == 1 else np.concatenate([it.x for it in batch], axis=0)
            y = await asyncio.get_running_loop().run_in_executor(self._executor, self.run_fn, x)
        except Exception as e:  # noqa: BLE001 - one failed batch answers its requests with 500, the loop goes on
            log.exception("edgekiln server: model call failed")
            for it in batch:
                if not it.future.done():
                    it.future.set_exception(ApiError(500, f"inference failed: {e.__class__.__name__}: {e}"))
            return
        self.metrics.inference.observe(time.perf_counter() - t0)
        self.metrics.batch_size.observe(rows)
        self.metrics.images.inc(rows)
        start = 0
        for it in batch:
            n = len(it.x)
            if not it.future.done():
                it.future.set_result(y[start : start + n])
            start += n

    async def close(self) -> None:
        """Finish every queued request, then stop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)


# ------------------------------------------------------- v2 request parsing

_DTYPES = {"FP32": np.dtype("<f4")}


@dataclass
class InferRequest:
    x: np.ndarray
    id: str | None
    binary_output: bool


def parse_infer_request(body: bytes, header_length: str | None, input_name: str, chw: tuple[int, int, int],
                        output_name: str, max_rows: int) -> InferRequest:
    """Validate a v2 infer request (JSON, or JSON + binary tensors) into a float32 NCHW array."""
    binary = b""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise ApiError(400, f"Inference-Header-Content-Length must be an integer, got '{header_length}'") from None
        if not 0 <= n <= len(body):
            raise ApiError(400, f"Inference-Header-Content-Length {n} is outside the body ({len(body)} bytes)")
        body, binary = body[:n], body[n:]
    try:
        req = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"malformed JSON in the request body: {e}") from None
    if not isinstance(req, dict):
        raise ApiError(400, "the request body must be a JSON object with an 'inputs' list")
    inputs = req.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ApiError(400, f"'inputs' must be a list holding exactly one tensor, '{input_name}'")
    t = inputs[0]
    if t.get("name") != input_name:
        raise ApiError(400, f"unknown input '{t.get('name')}'; this model's input is '{input_name}'")
    dtype = t.get("datatype")
    if dtype not in _DTYPES:
        raise ApiError(400, f"input '{input_name}': datatype {dtype!r} is not supported; expected 'FP32'")
    shape = t.get("shape")
    expected = f"[batch, {chw[0]}, {chw[1]}, {chw[2]}]"
    if (not isinstance(shape, list) or len(shape) != 4
            or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)):
        raise ApiError(400, f"input '{input_name}': shape {shape} is not {expected}")
    if tuple(shape[1:]) != chw or shape[0] < 1:
        raise ApiError(400, f"input '{input_name}': shape {shape} does not match the model's {expected} "
                            "(images preprocessed as bundle.json's 'preprocess' section says)")
    if shape[0] > max_rows:
        raise ApiError(413, f"input '{input_name}': batch of {shape[0]} exceeds the limit of {max_rows} per request")
    count = math.prod(shape)
    params = t.get("parameters") or {}
    if not isinstance(params, dict):
        raise ApiError(400, f"input '{input_name}': 'parameters' must be an object")
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if not isinstance(size, int) or size != len(binary):
            raise ApiError(400, f"input '{input_name}': binary_data_size {size!r} but {len(binary)} bytes follow the JSON header")
        if size != count * 4:
            raise ApiError(400, f"input '{input_name}': {size} bytes of binary data for shape {shape} "
                                f"(FP32 needs {count * 4})")
        x = np.frombuffer(binary, dtype=_DTYPES[dtype]).reshape(shape)
    else:
        if binary:
            raise ApiError(400, "binary data follows the JSON header but no input declares 'binary_data_size'")
        data = t.get("data")
        if data is None:
            raise ApiError(400, f"input '{input_name}' has no 'data'")
        try:
            x = np.asarray(data, dtype=np.float32)
        except (ValueError, TypeError):
            raise ApiError(400, f"input '{input_name}': 'data' must be a flat or nested list of {count} numbers") from None
        if x.size != count:
            raise ApiError(400, f"input '{input_name}': 'data' holds {x.size} values but shape {shape} needs {count}")
        x = x.reshape(shape)
    if not np.isfinite(x).all():
        raise ApiError(400, f"input '{input_name}': data holds NaN or infinite values")
    binary_output = bool((req.get("parameters") or {}).get("binary_data_output", False))
    outputs = req.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
            raise ApiError(400, "'outputs' must be a list of objects")
        for o in outputs:
            if o.get("name") != output_name:
                raise ApiError(400, f"unknown output '{o.get('name')}'; this model's output is '{output_name}'")
            if (o.get("parameters") or {}).get("binary_data"):
                binary_output = True
    rid = req.get("id")
    return InferRequest(np.ascontiguousarray(x, dtype=np.float32), None if rid is None else str(rid), binary_output)


# -------------------------------------------------------------------- app


class _BodyLimit:
    """ASGI middleware: 413 for bodies over max_bytes (Content-Length up front, or counted while streaming)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        msg = f"request body exceeds the limit of {self.max_bytes} bytes"
        for k, v in scope.get("headers", ()):
            if k == b"content-length":
                try:
                    too_big = int(v) > self.max_bytes
                except ValueError:
                    too_big = False
                if too_big:
                    return await _send_json(send, 413, {"error": msg + f" (Content-Length {int(v)})"})
        seen = 0

        async def limited():
            nonlocal seen
            m = await receive()
            if m["type"] == "http.request":
                seen += len(m.get("body", b""))
                if seen > self.max_bytes:
                    raise ApiError(413, msg)
            return m

        await self.app(scope, limited, send)


class _Observe:
    """ASGI middleware: request count and latency per endpoint and status code."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = [500]

        async def send_wrapper(m):
            if m["type"] == "http.response.start":
                status[0] = m["status"]
            await send(m)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            ep = endpoint_label(scope.get("path", ""))
            self.metrics.requests.labels(ep, str(status[0])).inc()
            self.metrics.latency.labels(ep).observe(time.perf_counter() - t0)


async def _send_json(send, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def _wants_self_test(settings: ServeSettings, clf: Any) -> bool:
    """settings.self_test, or by default: whenever the bundle has golden images."""
    return settings.self_test if settings.self_test is not None else bool(clf.bundle.meta.get("golden"))


def create_app(settings: ServeSettings, classifier: Any = None):
    """The FastAPI app. The model loads in its lifespan (or `classifier` is used as given)."""
    import runtime

    metrics = Metrics()
    state: dict[str, Any] = {"ready": False, "clf": None, "batcher": None}

    @asynccontextmanager
    async def lifespan(app):
        clf = classifier
        if clf is None:
            loop = asyncio.get_running_loop()
            clf = await loop.run_in_executor(None, lambda: runtime.load(
                settings.bundle_dir, backend=settings.backend, intra_op_threads=settings.intra_op_threads,
                max_pixels=settings.max_pixels, allow_engine_fallback=settings.allow_engine_fallback))
        if _wants_self_test(settings, clf):
            report = clf.self_test()  # BundleError / ParityError: the server does not start
            log.info("edgekiln server: self-test passed (%d golden images, max |Δlogit| %.2e)",
                     report.n_images, report.max_abs_diff)
        batcher = DynamicBatcher(clf.run, settings.max_batch, settings.max_delay_ms / 1000.0, settings.max_queue,
                                 metrics)
        batcher.start()
        state.update(clf=clf, batcher=batcher, ready=True)
        log.info("edgekiln server: model '%s' ready on backend '%s' (%s), max batch %d, max delay %.1f ms",
                 settings.model_name, clf.backend, clf.provider, settings.max_batch, settings.max_delay_ms)
        try:
            yield
        finally:
            state["ready"] = False
            await batcher.close()  # uvicorn has already let in-flight requests finish
            log.info("edgekiln server: stopped")

    async def api_error(request: Request, exc: ApiError):
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)

    async def http_error(request: Request, exc: StarletteHTTPException):
        msg = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404 and msg == "Not Found":
            msg = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            msg = f"method {request.method} is not allowed on {request.url.path}"
        return JSONResponse({"error": msg}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    async def validation_error(request: Request, exc: RequestValidationError):
        errs = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in exc.errors())
        return JSONResponse({"error": f"bad request: {errs}"}, status_code=400)

    app = FastAPI(title="edgekiln", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  exception_handlers={ApiError: api_error, StarletteHTTPException: http_error,
                                      RequestValidationError: validation_error})
    app.add_middleware(_BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(_Observe, metrics=metrics)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.edgekiln = state

    def clf_or_503():
        if not state["ready"]:
            raise ApiError(503, "model is not ready", {"Retry-After": "1"})
        return state["clf"]

    def check_model(name: str, version: str | None = None):
        if name != settings.model_name:
            raise ApiError(404, f"unknown model '{name}'; this server serves '{settings.model_name}'")
        if version is not None and version != "1":
            raise ApiError(404, f"model '{name}' has no version '{version}'; it has version '1'")

    async def predict_rows(x: np.ndarray) -> np.ndarray:
        clf_or_503()
        try:
            if sys.version_info >= (3, 11):  # a timeout scope: no extra task per request, unlike wait_for
                async with asyncio.timeout(settings.request_timeout_s):
                    return await state["batcher"].submit(x)
            return await asyncio.wait_for(state["batcher"].submit(x), settings.request_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(503, f"request timed out after {settings.request_timeout_s:g} s waiting for the model",
                           {"Retry-After": "1"}) from None

    @app.get("/v2/health/live")
    async def live():
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready():
        if not state["ready"]:
            raise ApiError(503, "model is not ready")
        return {"ready": True}

    @app.get("/v2")
    async def server_metadata():
        return {"name": "edgekiln", "version": _version(), "extensions": ["binary_tensor_data"]}

    def model_metadata():
        clf = clf_or_503()
        c, h, w = clf.input_shape
        return {
            "name": settings.model_name,
            "versions": ["1"],
            "platform": "onnxruntime_onnx",
            "inputs": [{"name": clf.bundle.input_name, "datatype": "FP32", "shape": [-1, c, h, w]}],
            "outputs": [{"name": clf.bundle.output_name, "datatype": "FP32", "shape": [-1, len(clf.class_names)]}],
            "parameters": {"backend": clf.backend, "provider": clf.provider, "class_names": clf.class_names,
                           "preprocess": clf.bundle.meta["preprocess"], "max_batch": settings.max_batch},
        }

    @app.get("/v2/models/{name}")
    async def metadata(name: str):
        check_model(name)
        return model_metadata()

    @app.get("/v2/models/{name}/versions/{version}")
    async def metadata_v(name: str, version: str):
        check_model(name, version)
        return model_metadata()

    @app.get("/v2/models/{name}/ready")
    async def model_ready(name: str):
        check_model(name)
        clf_or_503()
        return {"name": name, "ready": True}

    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready_v(name: str, version: str):
        check_model(name, version)
        clf_or_503()
        return {"name": name, "ready": True}

    async def infer(request: Request, name: str, version: str | None):
        check_model(name, version)
        clf = clf_or_503()
        body = await request.body()
        args = (body, request.headers.get(HEADER_LEN), clf.bundle.input_name, clf.input_shape,
                clf.bundle.output_name, settings.max_images_per_request)
        # Large JSON tensors take milliseconds to parse: do that off the event loop.
        req = parse_infer_request(*args) if len(body) < 65536 or request.headers.get(HEADER_LEN) \
            else await asyncio.to_thread(parse_infer_request, *args)
        y = np.ascontiguousarray(await predict_rows(req.x), dtype=np.float32)
        out: dict[str, Any] = {"name": clf.bundle.output_name, "datatype": "FP32", "shape": list(y.shape)}
        resp: dict[str, Any] = {"model_name": settings.model_name, "model_version": "1", "outputs": [out]}
        if req.id is not None:
            resp["id"] = req.id
        if not req.binary_output:
            out["data"] = y.ravel().tolist()
            return JSONResponse(resp)
        raw = y.astype("<f4", copy=False).tobytes()  # already float32: no copy on little-endian hosts
        out["parameters"] = {"binary_data_size": len(raw)}
        head = json.dumps(resp).encode()
        return Response(head + raw, media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(len(head))})

    async def infer_route(request: Request):
        return await infer(request, request.path_params["name"], request.path_params.get("version"))

    # The hot path as plain Starlette routes, matched first: FastAPI's dependency solving and the
    # walk past the other routes cost ~0.25 ms of event-loop time per request (profiled), a fifth
    # of what the loop spends on an infer request, and the loop is what caps batched throughput.
    # The endpoints take the raw request anyway, so FastAPI's validation has nothing to do here;
    # error handling is the same (the app's exception handlers see these routes' errors).
    app.router.routes[:0] = [
        Route("/v2/models/{name}/infer", infer_route, methods=["POST"]),
        Route("/v2/models/{name}/versions/{version}/infer", infer_route, methods=["POST"]),
    ]

    @app.post("/v1/classify")
    async def classify(request: Request):
        clf = clf_or_503()
        raw_k = request.query_params.get("top_k", "1")
        try:
            top_k = int(raw_k)
        except ValueError:
            top_k = 0
        if not 1 <= top_k <= len(clf.class_names):
            raise ApiError(400, f"top_k must be an integer from 1 to {len(clf.class_names)}, got '{raw_k}'")
        ctype = request.headers.get("content-type", "")
        images: list[tuple[str, bytes]] = []
        if ctype.startswith("multipart/form-data"):
            limit = settings.max_images_per_request
            try:
                async with request.form(max_files=limit, max_fields=limit) as form:
                    for key, value in form.multi_items():
                        if hasattr(value, "read"):
                            images.append((value.filename or key, await value.read()))
            except StarletteHTTPException as e:
                if "Too many files" in str(e.detail):
                    raise ApiError(413, f"more than {limit} images in one request (the limit)") from None
                raise ApiError(400, f"malformed multipart body: {e.detail}") from None
            if not images:
                raise ApiError(400, "the multipart body holds no files; send images as file fields")
        else:
            if ctype.startswith("application/json") or ctype.startswith("text/"):
                raise ApiError(400, f"Content-Type {ctype} is not an image; send image bytes or multipart/form-data")
            body = await request.body()
            if not body:
                raise ApiError(400, "empty body: send one encoded image (raw bytes) or multipart/form-data files")
            images.append(("<body>", body))
        if len(images) > settings.max_images_per_request:
            raise ApiError(413, f"{len(images)} images exceed the limit of {settings.max_images_per_request} per request")

        def decode():
            out = np.empty((len(images), *clf.input_shape), dtype=np.float32)
            for i, (fname, data) in enumerate(images):
                try:
                    out[i] = clf.preprocess(data)[0]
                except ImageError as e:
                    msg = str(e).replace("<image>", fname, 1)
                    raise ApiError(413 if isinstance(e, ImageTooLargeError) else 400, msg) from None
            return out

        x = await asyncio.to_thread(decode)
        logits = await predict_rows(x)
        preds = clf.predictions_from_logits(logits, top_k)
        return {
            "model_name": settings.model_name,
            "predictions": [
                {"filename": fname, "label": p.label, "index": p.index, "probability": p.probability,
                 "top_k": [{"label": lab, "probability": prob} for lab, prob in p.top_k]}
                for (fname, _), p in zip(images, preds)
            ],
        }

    @app.get("/metrics")
    async def prometheus():
        if state["batcher"] is not None:
            metrics.queue_depth.set(state["batcher"].depth)
        data, ctype = metrics.render()
        return Response(data, media_type=ctype)

    return app


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("edgekiln")
    except Exception:  # noqa: BLE001 - running from a source tree
        return "0+unknown"


def app_from_env():
    """uvicorn factory for `--workers N`: settings come from $EDGEKILN_SERVE_SETTINGS (JSON)."""
    if not logging.getLogger().handlers:  # a fresh worker process: log like the parent CLI does
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    raw = os.environ.get(SETTINGS_ENV)
    if not raw:
        raise EdgekilnError(f"${SETTINGS_ENV} is not set; start the server with `edgekiln serve BUNDLE`")
    return create_app(ServeSettings.model_validate_json(raw))


def serve(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
          access_log: bool = False, log_level: str = "info") -> None:
    """Run the server until SIGINT/SIGTERM; in-flight requests finish first.

    With one worker the model is loaded here first, so a bad bundle or an
    unavailable backend fails before uvicorn starts (a one-line CLI error);
    with several, each worker process loads its own copy.
    """
    import uvicorn

    import runtime

    common = dict(host=host, port=port, access_log=access_log, log_level=log_level, lifespan="on",
                  timeout_graceful_shutdown=int(settings.request_timeout_s) + 5)
    if workers == 1:
        clf = runtime.load(settings.bundle_dir, backend=settings.backend, intra_op_threads=settings.intra_op_threads,
                           max_pixels=settings.max_pixels, allow_engine_fallback=settings.allow_engine_fallback)
        if _wants_self_test(settings, clf):
            clf.self_test()  # here rather than in the lifespan: a failure is a one-line CLI error
            settings = settings.model_copy(update={"self_test": False})
        uvicorn.run(create_app(settings, classifier=clf), **common)
    else:
        runtime.read_bundle(settings.bundle_dir, verify=True)  # fail fast on a bad bundle
        os.environ[SETTINGS_ENV] = settings.model_dump_json()
        uvicorn.run("runtime.server:app_from_env", factory=True, workers=workers, **common)
