"""Load benchmark: `edgekiln serve` with dynamic batching on vs off, side by side.

    PYTHONPATH=. python bench/serve_load.py [BUNDLE] [--concurrency 32] [--requests 3000]

For each mode the script starts `edgekiln serve BUNDLE` on 127.0.0.1 (a free
port) in a subprocess, then drives it from a *separate* client process: N
threads with keep-alive connections each send single-image requests back to
back until the request budget or the time limit is spent. It reports
throughput and client-side p50/p99 latency per mode and the ratios. Traffic
stays on the loopback interface and every loop is bounded in count and time.

Modes: "batching off" is the same server with --max-batch 1 (every request
its own model call); "batching on" merges concurrent requests up to
--max-batch images or --max-delay-ms.

Requests go to the v2 infer endpoint with one preprocessed image as a binary
tensor (what tritonclient sends), or with --endpoint classify to /v1/classify
with an encoded PNG (decoding and preprocessing then run in the server too).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_payload(bundle: Path, endpoint: str) -> tuple[str, bytes, dict]:
    import numpy as np

    from runtime.bundle import read_bundle

    m = read_bundle(bundle, verify=False).manifest
    h, w = m.preprocess.spec.hw
    if endpoint == "classify":
        import io

        from PIL import Image

        img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28), dtype=np.uint8), mode="L")
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return "/v1/classify", buf.getvalue(), {"Content-Type": "image/png"}
    x = np.random.default_rng(0).normal(size=(1, 3, h, w)).astype("<f4")
    head = json.dumps({"inputs": [{"name": m.input.name, "shape": list(x.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "outputs": [{"name": m.output.name, "parameters": {"binary_data": True}}]}).encode()
    return ("/v2/models/edgekiln/infer", head + x.tobytes(),
            {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))})


# ------------------------------------------------------------------ client


def client_main(port: int, path: str, body_file: str, headers: dict, concurrency: int, requests: int,
                duration: float, warmup: int) -> None:
    """Runs in its own process; prints one JSON line with the latencies.

    One asyncio event loop (uvloop when installed) with `concurrency` keep-alive connections. The
    load generator shares the 2-core machine with the server, so it must be cheap: this costs
    about a third of the CPU per request of http.client in threads (the GIL-bound first version),
    which otherwise took CPU from whichever server mode needed it most. Hand-written HTTP/1.1
    because the request is fixed and the response only needs its status and Content-Length;
    aiohttp/httpx would add their own overhead to what is measured.
    """
    import asyncio

    try:
        import uvloop
    except ImportError:
        uvloop = None
    body = Path(body_file).read_bytes()
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    request = head.encode() + body
    lat: list[float] = []
    errors: list[str] = []

    async def one(reader, writer) -> float:
        t0 = time.perf_counter()
        writer.write(request)
        status_headers = await reader.readuntil(b"\r\n\r\n")
        lines = status_headers.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length = next((int(h.split(":", 1)[1]) for h in lines[1:] if h.lower().startswith("content-length:")), None)
        if length is None:
            raise RuntimeError(f"HTTP {status} without Content-Length")
        data = await reader.readexactly(length)
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {data[:200]!r}")
        return time.perf_counter() - t0

    async def main() -> float:
        budget = [requests]
        conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(concurrency)]
        for r, w in conns:
            for _ in range(warmup):
                await one(r, w)
        stop_at = time.perf_counter() + duration

        async def worker(conn) -> None:
            r, w = conn
            while budget[0] > 0 and time.perf_counter() < stop_at:
                budget[0] -= 1
                try:
                    lat.append(await one(r, w))
                except Exception as e:  # noqa: BLE001 - recorded and reported; reconnect and go on
                    errors.append(str(e))
                    w.close()
                    r, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in conns))
        return time.perf_counter() - t0

    elapsed = uvloop.run(main()) if uvloop is not None else asyncio.run(main())
    # The event loop may leave stdout non-blocking; a large write to the pipe would then be cut short.
    os.set_blocking(sys.stdout.fileno(), True)
    print(json.dumps({"latencies": lat, "elapsed": elapsed, "errors": errors[:5], "n_errors": len(errors)}))


def client_main_threads(port: int, path: str, body_file: str, headers: dict, concurrency: int, requests: int,
                        duration: float, warmup: int) -> None:
    """The first client: http.client in `concurrency` threads (--client-impl threads)."""
    body = Path(body_file).read_bytes()
    lock = threading.Lock()
    budget = [requests]
    lat: list[float] = []
    errors: list[str] = []

    def one(conn) -> float:
        t0 = time.perf_counter()
        conn.request("POST", path, body=body, headers=headers)
        r = conn.getresponse()
        data = r.read()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {data[:200]!r}")
        return time.perf_counter() - t0

    def worker(stop_at: float) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            for _ in range(warmup):
                one(conn)
            start.wait()
            while time.perf_counter() < stop_at:
                with lock:
                    if budget[0] <= 0:
                        return
                    budget[0] -= 1
                try:
                    dt = one(conn)
                except Exception as e:  # noqa: BLE001 - recorded and reported
                    with lock:
                        errors.append(str(e))
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                    continue
                with lock:
                    lat.append(dt)
        finally:
            conn.close()

    start = threading.Barrier(concurrency + 1)
    far = time.perf_counter() + 3600
    threads = [threading.Thread(target=worker, args=(far,)) for _ in range(concurrency)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    stop_at = t0 + duration
    # Workers check the shared deadline through the budget: stop by emptying it.
    while any(t.is_alive() for t in threads) and time.perf_counter() < stop_at:
        time.sleep(0.05)
    with lock:
        budget[0] = 0
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    print(json.dumps({"latencies": lat, "elapsed": elapsed, "errors": errors[:5], "n_errors": len(errors)}))


# ------------------------------------------------------------------ driver


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stdout.read() if proc.stdout else ''}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            c.request("GET", "/v2/health/ready")
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit("server did not become ready")


def run_mode(args, label: str, max_batch: int, body_file: Path, path: str, headers: dict) -> dict:
    port = free_port()
    cmd = [sys.executable, "-m", "pipeline.cli", "serve", str(args.bundle), "--host", "127.0.0.1", "--port", str(port),
           "--backend", "cpu", "--max-batch", str(max_batch), "--max-delay-ms", str(args.max_delay_ms),
           "--max-queue", str(max(256, args.concurrency * 2))]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    try:
        wait_ready(port, server)
        client = [sys.executable, __file__, "--client", "--port", str(port), "--path", path, "--body", str(body_file),
                  "--headers", json.dumps(headers), "--concurrency", str(args.concurrency),
                  "--requests", str(args.requests), "--duration", str(args.duration), "--warmup", "3",
                  "--client-impl", args.client_impl]
        r = subprocess.run(client, capture_output=True, text=True, timeout=args.duration + 120, env=env)
        if r.returncode != 0:
            raise SystemExit(f"client failed: {r.stderr[-2000:]}")
        res = json.loads(r.stdout.strip().splitlines()[-1])
        metrics = _scrape(port)
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    import numpy as np

    lat = np.asarray(res["latencies"]) * 1000
    calls = metrics.get("edgekiln_batch_size_count", 0.0)
    rows = metrics.get("edgekiln_batch_size_sum", 0.0)
    return {
        "mode": label, "max_batch": max_batch, "requests": len(lat), "errors": res["n_errors"],
        "throughput": len(lat) / res["elapsed"], "p50": float(np.percentile(lat, 50)),
        "p99": float(np.percentile(lat, 99)), "mean_batch": rows / calls if calls else float("nan"),
        "error_samples": res["errors"],
    }


def _scrape(port: int) -> dict:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", "/metrics")
    out = {}
    for line in c.getresponse().read().decode().splitlines():
        if line.startswith("edgekiln_batch_size_count") or line.startswith("edgekiln_batch_size_sum"):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


def model_alone(bundle: Path, max_batch: int, threads: int | None, seconds: float = 3.0) -> tuple[float, float]:
    """ms per image of the bare onnxruntime session at batch 1 and at max_batch (no HTTP),
    alternated so machine load hits both alike: the most batching can gain in the model itself."""
    import numpy as np

    import runtime

    clf = runtime.load(bundle, backend="cpu", intra_op_threads=threads)
    xs = {b: np.random.default_rng(0).normal(size=(b, *clf.input_shape)).astype(np.float32) for b in (1, max_batch)}
    per_img: dict[int, list[float]] = {1: [], max_batch: []}
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop:
        for b, x in xs.items():
            t = time.perf_counter()
            for _ in range(max(1, max_batch // b) if b == 1 else 1):
                clf.run(x)
            per_img[b].append((time.perf_counter() - t) / max_batch)
    return float(np.median(per_img[1]) * 1000), float(np.median(per_img[max_batch]) * 1000)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", nargs="?", type=Path, default=Path("/tmp/runs/demo/bundle"))
    ap.add_argument("--endpoint", choices=["infer", "classify"], default="infer")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--requests", type=int, default=3000, help="requests per mode (upper bound)")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds per mode (upper bound)")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-delay-ms", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads in the server")
    ap.add_argument("--rounds", type=int, default=1, help="alternate off/on this many times; the best round is shown")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--client-impl", choices=["asyncio", "threads"], default="asyncio",
                    help="load generator: one asyncio loop (default, light) or http.client threads (the first version)")
    # client mode (internal)
    ap.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--body", help=argparse.SUPPRESS)
    ap.add_argument("--headers", help=argparse.SUPPRESS)
    ap.add_argument("--warmup", type=int, default=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        fn = client_main if args.client_impl == "asyncio" else client_main_threads
        fn(args.port, args.path, args.body, json.loads(args.headers), args.concurrency, args.requests,
                    args.duration, args.warmup)
        return
    if not (args.bundle / "bundle.json").is_file():
        raise SystemExit(f"{args.bundle}: not a bundle; run `edgekiln demo --runs-dir /tmp/runs` or pass a bundle path")
    import tempfile

    path, body, headers = make_payload(args.bundle, args.endpoint)
    results: dict[str, list[dict]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory() as tmp:
        body_file = Path(tmp) / "body.bin"
        body_file.write_bytes(body)
        for _ in range(args.rounds):
            results["off"].append(run_mode(args, "batching off (max-batch 1)", 1, body_file, path, headers))
            results["on"].append(run_mode(args, f"batching on (max-batch {args.max_batch}, "
                                                f"{args.max_delay_ms:g} ms)", args.max_batch, body_file, path, headers))
    off = max(results["off"], key=lambda r: r["throughput"])
    on = max(results["on"], key=lambda r: r["throughput"])
    print(f"\nedgekiln serve load test: {args.bundle} | endpoint {path} | {args.concurrency} concurrent clients "
          f"(separate process) | 127.0.0.1 | cpu backend | rounds {args.rounds}")
    print(f"{'mode':44s} {'req':>6s} {'err':>4s} {'req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'mean batch':>10s}")
    for r in (off, on):
        print(f"{r['mode']:44s} {r['requests']:6d} {r['errors']:4d} {r['throughput']:8.1f} {r['p50']:8.2f} "
              f"{r['p99']:8.2f} {r['mean_batch']:10.2f}")
    b1, bn = model_alone(args.bundle, args.max_batch, args.threads)
    print(f"{'model alone, in-process (no HTTP)':44s} batch 1: {b1:.2f} ms/image | batch {args.max_batch}: {bn:.2f} "
          f"ms/image -> at most {b1 / bn:.2f}x from batching inside the model")
    if args.rounds > 1:
        print("every round (off | on req/s, p99 ms): " + "; ".join(
            f"{a['throughput']:.0f}/{a['p99']:.0f} | {b['throughput']:.0f}/{b['p99']:.0f}"
            for a, b in zip(results["off"], results["on"])))
    ratio = on["throughput"] / off["throughput"]
    print(f"throughput ratio on/off (best rounds): {ratio:.2f}x (target >= 2x) | p99 on/off: "
          f"{on['p99'] / off['p99']:.2f} (target <= 1)")
    if args.rounds > 1:
        # Rounds run off, on, off, on...: each pair shares the machine's load of its moment.
        pairs = [(b["throughput"] / a["throughput"], b["p99"] / a["p99"]) for a, b in zip(results["off"], results["on"])]
        med = sorted(pairs)[len(pairs) // 2]
        print("paired rounds, throughput on/off: " + ", ".join(f"{t:.2f}x" for t, _ in pairs)
              + " | p99 on/off: " + ", ".join(f"{q:.2f}" for _, q in pairs)
              + f" | median pair {med[0]:.2f}x at p99 ratio {med[1]:.2f}")
    for r in (off, on):
        if r["errors"]:
            print(f"  {r['mode']}: {r['errors']} errors, e.g. {r['error_samples'][:2]}")
    if args.json:
        args.json.write_text(json.dumps({"off": results["off"], "on": results["on"], "ratio_best": ratio,
                                         "model_alone_ms_per_image": {"1": b1, str(args.max_batch): bn}}, indent=2))


if __name__ == "__main__":
    main()
