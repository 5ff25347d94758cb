"""ASGI middleware: the request body limit, and request counts and latency for Prometheus."""

from __future__ import annotations

import json
import time

from runtime.serve.metrics import Metrics, endpoint_label
from runtime.serve.protocol import ApiError


async def send_json(send, status: int, payload: dict) -> None:
    """A whole JSON response sent straight from middleware (the connection is closed after it)."""
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """413 for bodies over max_bytes (Content-Length up front, or counted while streaming)."""

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
                    return await send_json(send, 413, {"error": msg + f" (Content-Length {int(v)})"})
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


class ObserveMiddleware:
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
