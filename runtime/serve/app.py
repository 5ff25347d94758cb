"""The FastAPI app: thin module-level handlers over the ModelHandle kept in `app.state.model`.

    GET  /v2/health/live, /v2/health/ready
    GET  /v2                                   server metadata
    GET  /v2/models/{name}[/versions/1]        model metadata (input FP32 [-1,3,H,W], output FP32 [-1,classes])
    GET  /v2/models/{name}[/versions/1]/ready
    POST /v2/models/{name}[/versions/1]/infer  JSON tensors, or Triton's binary tensor extension
    POST /v1/classify?top_k=3[&ood=false]      encoded images (multipart files or raw bytes) -> labels, calibrated
                                               probabilities, OOD score, known ("unknown" below the threshold);
                                               a multilabel bundle: each image's label set and every label's probability
    GET  /metrics                              Prometheus

The model loads in the lifespan, never at import (or a loaded classifier is handed to
create_app, as `serve` and the tests do), so tests can build many apps.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route

from runtime.errors import ImageError, ImageTooLargeError
from runtime.serve.batcher import DynamicBatcher
from runtime.serve.metrics import Metrics
from runtime.serve.middleware import BodyLimitMiddleware, ObserveMiddleware
from runtime.serve.protocol import (
    HEADER_LEN, ApiError, MetadataTensor, ModelMetadataResponse, ModelSignature, ServerMetadataResponse,
    encode_infer_response, parse_infer_request, validation_message,
)
from runtime.serve.settings import ServeSettings

log = logging.getLogger("edgekiln.server")
# Triton's platform name for what the backend runs
_PLATFORM = {"tensorrt-engine": "tensorrt_plan"}
# The v2 infer extra output with the OOD score (runtime.trust), when the bundle has an OOD section
SCORE_OUTPUT = "ood_score"
# A multilabel bundle's extra v2 outputs (runtime.multilabel): sigmoid probabilities, and the label set as 0/1
PROBS_OUTPUT, LABELS_OUTPUT = "probabilities", "label_set"


@dataclass
class ModelHandle:
    """The served model and its batcher; `ready` once the lifespan has loaded (and self-tested) it."""

    settings: ServeSettings
    metrics: Metrics
    clf: Any = None
    batcher: DynamicBatcher | None = None
    ready: bool = False
    signature: ModelSignature | None = field(default=None, repr=False)

    def clf_or_503(self) -> Any:
        if not self.ready:
            raise ApiError(503, "model is not ready", {"Retry-After": "1"})
        return self.clf

    def check_model(self, name: str, version: str | None = None) -> None:
        served = self.settings.model_name
        if name != served:
            raise ApiError(404, f"unknown model '{name}'; this server serves '{served}'")
        if version is not None and version != "1":
            raise ApiError(404, f"model '{name}' has no version '{version}'; it has version '1'")

    async def predict_rows(self, x: np.ndarray) -> np.ndarray:
        self.clf_or_503()
        timeout = self.settings.request_timeout_s
        try:
            if sys.version_info >= (3, 11):  # a timeout scope: no extra task per request, unlike wait_for
                async with asyncio.timeout(timeout):
                    return await self.batcher.submit(x)
            return await asyncio.wait_for(self.batcher.submit(x), timeout)
        except asyncio.TimeoutError:
            raise ApiError(503, f"request timed out after {timeout:g} s waiting for the model",
                           {"Retry-After": "1"}) from None


def _handle(request: Request) -> ModelHandle:
    return request.app.state.model


def wants_self_test(settings: ServeSettings, clf: Any) -> bool:
    """settings.self_test, or by default: whenever the bundle has golden images."""
    return settings.self_test if settings.self_test is not None else clf.bundle.manifest.golden is not None


def load_classifier(settings: ServeSettings) -> Any:
    import runtime

    return runtime.load(settings.bundle_dir, backend=settings.backend, intra_op_threads=settings.intra_op_threads,
                        max_pixels=settings.max_pixels, allow_engine_fallback=settings.allow_engine_fallback,
                        artifact=settings.artifact, backend_options=settings.backend_options(),
                        public_key=settings.public_key, ood=settings.ood)


@asynccontextmanager
async def lifespan(app: FastAPI):
    """Load (unless given) and self-test the model, start the batcher; on shutdown drain it."""
    h: ModelHandle = app.state.model
    settings = h.settings
    clf = h.clf if h.clf is not None else await asyncio.get_running_loop().run_in_executor(
        None, load_classifier, settings)
    if wants_self_test(settings, clf):
        report = clf.self_test()  # BundleError / ParityError: the server does not start
        log.info("edgekiln server: self-test passed (%d golden images, max |Δlogit| %.2e)",
                 report.n_images, report.max_abs_diff)
    batcher = DynamicBatcher(clf.run, settings.max_batch, settings.max_delay_ms / 1000.0, settings.max_queue,
                             h.metrics)
    batcher.start()
    h.signature = ModelSignature(clf.bundle.input_name, clf.bundle.output_name, tuple(clf.input_shape),
                                 settings.max_images_per_request,
                                 score_name=SCORE_OUTPUT if clf.unknown_label is not None else None,
                                 label_names=(PROBS_OUTPUT, LABELS_OUTPUT) if clf.multilabel is not None else ())
    h.clf, h.batcher, h.ready = clf, batcher, True
    log.info("edgekiln server: model '%s' ready: artifact '%s' on backend '%s' (%s), max batch %d, max delay %.1f ms",
             settings.model_name, clf.artifact, clf.backend, clf.provider, settings.max_batch, settings.max_delay_ms)
    try:
        yield
    finally:
        h.ready = False
        await batcher.close()  # uvicorn has already let in-flight requests finish
        log.info("edgekiln server: stopped")


# ---------------------------------------------------------------- handlers

async def live():
    return {"live": True}


async def ready(request: Request):
    if not _handle(request).ready:
        raise ApiError(503, "model is not ready")
    return {"ready": True}


async def server_metadata():
    return ServerMetadataResponse(name="edgekiln", version=_version(), extensions=["binary_tensor_data"])


def _model_metadata(h: ModelHandle) -> ModelMetadataResponse:
    clf = h.clf_or_503()
    c, height, width = clf.input_shape
    return ModelMetadataResponse(
        name=h.settings.model_name,
        versions=["1"],
        platform=_PLATFORM.get(clf.backend, "onnxruntime_onnx"),
        inputs=[MetadataTensor(name=clf.bundle.input_name, datatype="FP32", shape=[-1, c, height, width])],
        outputs=[MetadataTensor(name=clf.bundle.output_name, datatype="FP32", shape=[-1, len(clf.class_names)])]
        + ([MetadataTensor(name=SCORE_OUTPUT, datatype="FP32", shape=[-1])] if h.signature.score_name else [])
        + [MetadataTensor(name=n, datatype="FP32", shape=[-1, len(clf.class_names)]) for n in h.signature.label_names],
        parameters={"backend": clf.backend, "provider": clf.provider, "class_names": clf.class_names,
                    "preprocess": clf.bundle.manifest.preprocess.model_dump(mode="json"), "max_batch": h.settings.max_batch,
                    **({"trust": clf.trust.model_dump(mode="json", exclude={"fit"})} if clf.trust else {}),
                    **({"task": "multilabel", "thresholds": clf.multilabel.thresholds} if clf.multilabel else {})},
    )


async def model_metadata(request: Request, name: str):
    _handle(request).check_model(name)
    return _model_metadata(_handle(request))


async def model_version_metadata(request: Request, name: str, version: str):
    _handle(request).check_model(name, version)
    return _model_metadata(_handle(request))


def _model_ready(h: ModelHandle, name: str, version: str | None = None) -> dict:
    h.check_model(name, version)
    h.clf_or_503()
    return {"name": name, "ready": True}


async def model_ready(request: Request, name: str):
    return _model_ready(_handle(request), name)


async def model_version_ready(request: Request, name: str, version: str):
    return _model_ready(_handle(request), name, version)


async def infer(request: Request):
    """POST /v2/models/{name}[/versions/{version}]/infer (a plain Starlette route: see add_routes)."""
    h = _handle(request)
    h.check_model(request.path_params["name"], request.path_params.get("version"))
    h.clf_or_503()
    body = await request.body()
    header_len = request.headers.get(HEADER_LEN)
    # Large JSON tensors take milliseconds to parse: do that off the event loop.
    if len(body) < 65536 or header_len:
        req = parse_infer_request(body, header_len, h.signature)
    else:
        req = await asyncio.to_thread(parse_infer_request, body, header_len, h.signature)
    y = await h.predict_rows(req.x)
    sig, wanted = h.signature, req.outputs or h.signature.output_names
    tensors = [(sig.output_name, y)] if sig.output_name in wanted else []
    if sig.score_name in wanted:  # the OOD score from the logits, as the runtime computes it for /v1/classify
        tensors.append((sig.score_name, h.clf.outputs(y).score))
    if sig.label_names and set(sig.label_names) & set(wanted):  # as /v1/classify decides, from the logits
        from runtime.multilabel import decide

        probs, chosen = decide(y, h.clf.multilabel.thresholds)
        tensors += [(n, t) for n, t in ((PROBS_OUTPUT, probs), (LABELS_OUTPUT, chosen)) if n in wanted]
    content, head_len = encode_infer_response(tensors, h.settings.model_name, req.id, req.binary_output)
    if head_len is None:
        return Response(content, media_type="application/json")
    return Response(content, media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(head_len)})


async def _read_images(request: Request, limit: int) -> list[tuple[str, bytes]]:
    """(file name, encoded bytes) of every image in a /v1/classify request."""
    ctype = request.headers.get("content-type", "")
    images: list[tuple[str, bytes]] = []
    if ctype.startswith("multipart/form-data"):
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
        return images
    if ctype.startswith("application/json") or ctype.startswith("text/"):
        raise ApiError(400, f"Content-Type {ctype} is not an image; send image bytes or multipart/form-data")
    body = await request.body()
    if not body:
        raise ApiError(400, "empty body: send one encoded image (raw bytes) or multipart/form-data files")
    return [("<body>", body)]


def _decode(clf: Any, images: list[tuple[str, bytes]]) -> np.ndarray:
    out = np.empty((len(images), *clf.input_shape), dtype=np.float32)
    for i, (fname, data) in enumerate(images):
        try:
            out[i] = clf.preprocess(data)[0]
        except ImageError as e:
            msg = str(e).replace("<image>", fname, 1)
            raise ApiError(413 if isinstance(e, ImageTooLargeError) else 400, msg) from None
    return out


async def classify(request: Request):
    h = _handle(request)
    clf = h.clf_or_503()
    raw_k = request.query_params.get("top_k", "1")
    try:
        top_k = int(raw_k)
    except ValueError:
        top_k = 0
    if not 1 <= top_k <= len(clf.class_names):
        raise ApiError(400, f"top_k must be an integer from 1 to {len(clf.class_names)}, got '{raw_k}'")
    raw_ood = request.query_params.get("ood")
    if raw_ood is not None and raw_ood.lower() not in _BOOL:
        raise ApiError(400, f"ood must be true or false, got '{raw_ood}'")
    ood = None if raw_ood is None else _BOOL[raw_ood.lower()]
    limit = h.settings.max_images_per_request
    images = await _read_images(request, limit)
    if len(images) > limit:
        raise ApiError(413, f"{len(images)} images exceed the limit of {limit} per request")
    logits = await h.predict_rows(await asyncio.to_thread(_decode, clf, images))
    preds = clf.predictions_from_logits(logits, top_k, ood=ood)
    if clf.multilabel is not None:
        return {"model_name": h.settings.model_name, "task": "multilabel",
                "predictions": [{"filename": fname, "labels": p.labels, "probabilities": p.probabilities}
                                for (fname, _), p in zip(images, preds)]}
    return {
        "model_name": h.settings.model_name,
        "predictions": [
            {"filename": fname, "label": p.label, "index": p.index, "probability": p.probability,
             "known": p.known, "score": p.score,
             "top_k": [{"label": lab, "probability": prob} for lab, prob in p.top_k]}
            for (fname, _), p in zip(images, preds)
        ],
    }


_BOOL = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


async def prometheus(request: Request):
    h = _handle(request)
    if h.batcher is not None:
        h.metrics.queue_depth.set(h.batcher.depth)
    data, ctype = h.metrics.render()
    return Response(data, media_type=ctype)


# ------------------------------------------------------------ error handlers


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
    return JSONResponse({"error": validation_message(exc.errors())}, status_code=400)


# ------------------------------------------------------------------- the app


# (path, handler, method): FastAPI routes, after the infer routes
_ROUTES = [
    ("/v2/health/live", live, "GET"),
    ("/v2/health/ready", ready, "GET"),
    ("/v2", server_metadata, "GET"),
    ("/v2/models/{name}", model_metadata, "GET"),
    ("/v2/models/{name}/versions/{version}", model_version_metadata, "GET"),
    ("/v2/models/{name}/ready", model_ready, "GET"),
    ("/v2/models/{name}/versions/{version}/ready", model_version_ready, "GET"),
    ("/v1/classify", classify, "POST"),
    ("/metrics", prometheus, "GET"),
]


def add_routes(app: FastAPI) -> None:
    for path, handler, method in _ROUTES:
        app.add_api_route(path, handler, methods=[method])
    # The hot path as plain Starlette routes, matched first: FastAPI's dependency solving and the
    # walk past the other routes cost ~0.25 ms of event-loop time per request (profiled), a fifth
    # of what the loop spends on an infer request, and the loop is what caps batched throughput.
    # The endpoint takes the raw request anyway, so FastAPI's validation has nothing to do here;
    # error handling is the same (the app's exception handlers see these routes' errors).
    app.router.routes[:0] = [
        Route("/v2/models/{name}/infer", infer, methods=["POST"]),
        Route("/v2/models/{name}/versions/{version}/infer", infer, methods=["POST"]),
    ]


def add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)


def add_middleware(app: FastAPI, settings: ServeSettings, metrics: Metrics) -> None:
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(ObserveMiddleware, metrics=metrics)  # outermost: it also sees the body limit's 413s


def create_app(settings: ServeSettings, classifier: Any = None) -> FastAPI:
    """The FastAPI app. The model loads in its lifespan (or `classifier` is used as given)."""
    metrics = Metrics()
    app = FastAPI(title="edgekiln", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    add_error_handlers(app)
    add_middleware(app, settings, metrics)
    add_routes(app)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.model = ModelHandle(settings, metrics, clf=classifier)
    return app


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("edgekiln")
    except Exception:  # noqa: BLE001 - running from a source tree
        return "0+unknown"
