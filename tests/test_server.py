"""The HTTP server against real clients on 127.0.0.1 (a uvicorn server in a
thread, or `edgekiln serve` in a subprocess): tritonclient, httpx, limits,
batching, metrics, graceful shutdown, and no torch anywhere on the serving path."""

import io
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import runtime
from runtime.serve import ServeSettings, create_app

MODEL = "edgekiln"


@contextmanager
def running_server(app):
    """Serve `app` with uvicorn in a thread on 127.0.0.1 (a free port); yields the base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert t.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        t.join(15)
        sock.close()


@pytest.fixture(scope="module")
def bundle_dir(tiny_run):
    return tiny_run[1] / "bundle"


@pytest.fixture(scope="module")
def clf(bundle_dir):
    return runtime.load(bundle_dir, intra_op_threads=1)


def _settings(bundle_dir, **kw):
    base = dict(bundle_dir=str(bundle_dir), backend="cpu", max_batch=8, max_delay_ms=2, max_body_bytes=1 << 20)
    base.update(kw)
    return ServeSettings(**base)


@pytest.fixture(scope="module")
def server(bundle_dir, clf):
    with running_server(create_app(_settings(bundle_dir), classifier=clf)) as url:
        yield url


@pytest.fixture(scope="module")
def images(tiny_data, tmp_path_factory):
    """Encoded images: good PNGs, a truncated JPEG, text, a 100-megapixel PNG."""
    d = tmp_path_factory.mktemp("imgs")
    pngs = sorted(tiny_data.rglob("*.png"))[::9][:5]
    rng = np.random.default_rng(0)
    jpg = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(jpg, format="JPEG", quality=90)
    bomb = d / "bomb.png"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        Image.new("1", (10_000, 10_000)).save(bomb)
    return {
        "paths": pngs,
        "png": [p.read_bytes() for p in pngs],
        "truncated_jpeg": jpg.getvalue()[: len(jpg.getvalue()) // 2],
        "text": b"just some text, not an image\n",
        "bomb": bomb.read_bytes(),
    }


def _binary_tensor(x):
    return x.astype("<f4").tobytes()


# ------------------------------------------------------------- tritonclient


def test_tritonclient_health_metadata_and_infer(server, clf):
    import tritonclient.http as triton

    c = triton.InferenceServerClient(server)
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready(MODEL)
    assert c.get_server_metadata()["name"] == "edgekiln"
    meta = c.get_model_metadata(MODEL)
    c_, h, w = clf.input_shape
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, c_, h, w]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, len(clf.class_names)]},
                               {"name": "ood_score", "datatype": "FP32", "shape": [-1]}]  # the bundle's OOD score
    assert meta["versions"] == ["1"]
    x = np.random.default_rng(1).normal(size=(3, c_, h, w)).astype(np.float32)
    want = clf.run(x)
    for binary in (True, False):  # Triton's binary tensor extension, and plain JSON tensors
        inp = triton.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        out = triton.InferRequestedOutput("logits", binary_data=binary)
        r = c.infer(MODEL, [inp], outputs=[out], request_id="req-7")
        assert r.get_response()["id"] == "req-7" and r.get_response()["model_name"] == MODEL
        assert np.abs(r.as_numpy("logits") - want).max() <= 1e-5
    r = c.infer(MODEL, [inp], model_version="1")  # no outputs named: all of them, binary
    assert np.abs(r.as_numpy("logits") - want).max() <= 1e-5
    assert np.abs(r.as_numpy("ood_score") - clf.outputs(want).score).max() <= 1e-4
    with pytest.raises(triton.InferenceServerException, match="unknown model 'resnet'"):
        c.get_model_metadata("resnet")
    c.close()


# --------------------------------------------------------------- bad inputs


def _infer_json(shape, datatype="FP32", data=None, name="input"):
    n = int(np.prod(shape))
    return json.dumps({"inputs": [{"name": name, "shape": shape, "datatype": datatype,
                                   "data": data if data is not None else [0.0] * n}]})


BAD = {
    "malformed JSON": ("POST", f"/v2/models/{MODEL}/infer", {"content": b'{"inputs": [{"name": '}, 400,
                       "malformed JSON in the request body"),
    "wrong shape": ("POST", f"/v2/models/{MODEL}/infer", {"content": _infer_json([1, 3, 16, 16])}, 400,
                    "shape [1, 3, 16, 16] does not match the model's [batch, 3, 32, 32]"),
    "wrong rank": ("POST", f"/v2/models/{MODEL}/infer", {"content": _infer_json([3, 32, 32])}, 400,
                   "shape [3, 32, 32] is not [batch, 3, 32, 32]"),
    "wrong dtype": ("POST", f"/v2/models/{MODEL}/infer", {"content": _infer_json([1, 3, 32, 32], "INT64")}, 400,
                    "datatype 'INT64' is not supported; expected 'FP32'"),
    "wrong data count": ("POST", f"/v2/models/{MODEL}/infer",
                         {"content": _infer_json([1, 3, 32, 32], data=[0.5] * 10)}, 400,
                         "'data' holds 10 values but shape [1, 3, 32, 32] needs 3072"),
    "non-numeric data": ("POST", f"/v2/models/{MODEL}/infer",
                         {"content": _infer_json([1, 3, 32, 32], data=["a"] * 3072)}, 400, "must be a flat or nested list"),
    "wrong input name": ("POST", f"/v2/models/{MODEL}/infer", {"content": _infer_json([1, 3, 32, 32], name="x")}, 400,
                         "unknown input 'x'; this model's input is 'input'"),
    "unknown model (infer)": ("POST", "/v2/models/resnet/infer", {"content": _infer_json([1, 3, 32, 32])}, 404,
                              "unknown model 'resnet'; this server serves 'edgekiln'"),
    "unknown model (metadata)": ("GET", "/v2/models/resnet", {}, 404, "unknown model 'resnet'"),
    "unknown version": ("GET", f"/v2/models/{MODEL}/versions/2", {}, 404, "has no version '2'"),
    "unknown endpoint": ("GET", "/v3/whatever", {}, 404, "no such endpoint: GET /v3/whatever"),
    "truncated JPEG": ("POST", "/v1/classify", {"files": {"file": ("cut.jpg", "truncated_jpeg")}}, 400,
                       "cut.jpg: cannot decode image (OSError: image file is truncated"),
    "non-image upload": ("POST", "/v1/classify", {"files": {"file": ("notes.txt", "text")}}, 400,
                         "notes.txt: not an image"),
    "non-image raw body": ("POST", "/v1/classify", {"content": "text"}, 400, "<body>: not an image"),
    "empty body": ("POST", "/v1/classify", {"content": b""}, 400, "empty body"),
    "bad top_k": ("POST", "/v1/classify?top_k=zero", {"content": "png0"}, 400, "top_k must be an integer from 1 to 3"),
    "100-megapixel image": ("POST", "/v1/classify", {"files": {"file": ("bomb.png", "bomb")}}, 413,
                            "bomb.png: image is 10000x10000 = 100.0 megapixels, over the limit of 50.0 megapixels"),
    "oversize body": ("POST", "/v1/classify", {"content": b"\0" * (2 << 20)}, 413,
                      "request body exceeds the limit of 1048576 bytes (Content-Length 2097152)"),
    "oversize chunked body": ("POST", "/v1/classify", {"content": "chunked"}, 413,
                              "request body exceeds the limit of 1048576 bytes"),
    "too many images": ("POST", "/v1/classify", {"files": "many"}, 413, "more than 64 images in one request"),
    "malformed multipart": ("POST", "/v1/classify", {"content": "bad_multipart"}, 400, "malformed multipart body"),
    "oversize tensor batch": ("POST", f"/v2/models/{MODEL}/infer", {"content": "big_batch"}, 413,
                              "batch of 65 exceeds the limit of 64 per request"),
}


def _resolve(kw, images):
    kw = dict(kw)
    if kw.get("files") == "many":
        kw["files"] = [("f", (f"{i}.png", images["png"][0])) for i in range(65)]
    elif "files" in kw:
        kw["files"] = {k: (fname, images[key]) for k, (fname, key) in kw["files"].items()}
    c = kw.get("content")
    if c == "text":
        kw["content"] = images["text"]
    elif c == "png0":
        kw["content"] = images["png"][0]
    elif c == "chunked":
        kw["content"] = (b"\0" * 65536 for _ in range(40))  # no Content-Length: counted while streaming
    elif c == "bad_multipart":
        kw["content"] = b"--xyz\r\nContent-Disposition: form-data; name=\"f\"; filename=\"a.png\"\r\n\r\nabc"
        kw["headers"] = {"content-type": "multipart/form-data"}  # no boundary
    elif c == "big_batch":
        x = np.zeros((65, 3, 32, 32), np.float32)
        head = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                       "parameters": {"binary_data_size": x.nbytes}}]}).encode()
        kw["content"] = head + _binary_tensor(x)
        kw["headers"] = {"Inference-Header-Content-Length": str(len(head))}
    return kw


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_a_clear_4xx_and_the_server_keeps_serving(server, images, clf, case):
    assert clf.input_shape == (3, 32, 32) and len(clf.class_names) == 3  # the messages above assume the tiny bundle
    method, path, kw, status, message = BAD[case]
    with httpx.Client(base_url=f"http://{server}", timeout=30) as c:
        r = c.request(method, path, **_resolve(kw, images))
        assert r.status_code == status, r.text
        assert r.headers["content-type"].startswith("application/json")
        assert message in r.json()["error"]
    with httpx.Client(base_url=f"http://{server}", timeout=30) as c:  # a fresh connection still gets answers
        ok = c.post("/v1/classify", content=images["png"][0])
        assert ok.status_code == 200 and ok.json()["predictions"][0]["label"] in [*clf.class_names, "unknown"]


# ----------------------------------------------------------- /v1/classify


def test_classify_multipart_and_raw_bytes_match_the_runtime(server, images, clf):
    want = clf.predict(images["paths"], top_k=2)
    with httpx.Client(base_url=f"http://{server}", timeout=30) as c:
        files = [("images", (p.name, data, "image/png")) for p, data in zip(images["paths"], images["png"])]
        r = c.post("/v1/classify", params={"top_k": 2}, files=files)
        assert r.status_code == 200, r.text
        preds = r.json()["predictions"]
        assert [p["filename"] for p in preds] == [p.name for p in images["paths"]]
        for got, exp in zip(preds, want):
            assert got["label"] == exp.label and abs(got["probability"] - exp.probability) <= 1e-5
            assert [t["label"] for t in got["top_k"]] == [lab for lab, _ in exp.top_k]
        r = c.post("/v1/classify", content=images["png"][1], headers={"content-type": "image/png"})
        assert r.json()["predictions"][0]["label"] == want[1].label


def _noise_png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_classify_answers_unknown_out_of_domain_and_the_label_in_domain(server, clf, tiny_run):
    """The held-out digit the served model scores most in-distribution gets its label; random-noise images,
    which the tiny model scores below every digit, get `unknown`; ?ood=false turns the answer off."""
    split = json.loads((tiny_run[1] / "split.json").read_text())
    held_out = split["val"] + split["test"]
    scores = [p.score for p in clf.predict([f"{split['root']}/{p}" for p, _ in held_out])]
    path, label = held_out[int(np.argmax(scores))]
    noise = [_noise_png(seed) for seed in range(4)]
    runtime_says = clf.predict(noise)
    assert any(not p.known for p in runtime_says), [p.score for p in runtime_says]
    with httpx.Client(base_url=f"http://{server}", timeout=30) as c:
        r = c.post("/v1/classify", content=open(f"{split['root']}/{path}", "rb").read()).json()["predictions"][0]
        assert r["known"] and r["label"] == clf.class_names[label] and r["score"] >= clf.trust.ood.threshold
        for body, want in zip(noise, runtime_says):  # the server answers exactly as the runtime
            got = c.post("/v1/classify", content=body).json()["predictions"][0]
            assert (got["label"], got["known"]) == (want.label, want.known)
            assert abs(got["score"] - want.score) <= 1e-4 and abs(got["probability"] - want.probability) <= 1e-5
        unknown = next(b for b, p in zip(noise, runtime_says) if not p.known)
        got = c.post("/v1/classify", content=unknown).json()["predictions"][0]
        assert got["label"] == "unknown" and not got["known"] and got["score"] < clf.trust.ood.threshold
        got = c.post("/v1/classify", params={"ood": "false"}, content=unknown).json()["predictions"][0]
        assert got["known"] and got["label"] == clf.class_names[got["index"]]
        r = c.post("/v1/classify", params={"ood": "maybe"}, content=unknown)
        assert r.status_code == 400 and r.json()["error"] == "ood must be true or false, got 'maybe'"


def test_infer_returns_the_ood_score_as_an_extra_output(server, clf):
    c_, h, w = clf.input_shape
    x = np.random.default_rng(3).normal(size=(2, c_, h, w)).astype(np.float32)
    with httpx.Client(base_url=f"http://{server}", timeout=30) as c:
        body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
        out = {o["name"]: o for o in c.post(f"/v2/models/{MODEL}/infer", json=body).json()["outputs"]}
        assert out["ood_score"]["shape"] == [2] and out["ood_score"]["datatype"] == "FP32"
        assert np.allclose(out["ood_score"]["data"], clf.outputs(clf.run(x)).score, atol=1e-4)
        only = c.post(f"/v2/models/{MODEL}/infer", json={**body, "outputs": [{"name": "logits"}]}).json()
        assert [o["name"] for o in only["outputs"]] == ["logits"]
        bad = c.post(f"/v2/models/{MODEL}/infer", json={**body, "outputs": [{"name": "probs"}]})
        assert bad.status_code == 400 and bad.json()["error"] == "unknown output 'probs'; this model's outputs are logits, ood_score"


# ---------------------------------------------- batching, queue, timeout, metrics


def _post_many(url, bodies, path="/v1/classify"):
    def one(body):
        with httpx.Client(base_url=f"http://{url}", timeout=30) as c:
            return c.post(path, content=body)

    with ThreadPoolExecutor(len(bodies)) as ex:
        return list(ex.map(one, bodies))


def _metric(text, name):
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_dynamic_batching_merges_concurrent_requests(bundle_dir, clf, images):
    app = create_app(_settings(bundle_dir, max_batch=16, max_delay_ms=300), classifier=clf)
    with running_server(app) as url:
        bodies = [images["png"][i % 5] for i in range(8)]
        rs = _post_many(url, bodies)
        assert [r.status_code for r in rs] == [200] * 8
        want = clf.predict(images["paths"])
        assert [r.json()["predictions"][0]["label"] for r in rs] == [want[i % 5].label for i in range(8)]
        m = httpx.get(f"http://{url}/metrics").text
    calls, rows = _metric(m, "edgekiln_batch_size_count"), _metric(m, "edgekiln_batch_size_sum")
    assert rows == 8 and calls < 8, f"8 concurrent requests ran as {calls} model calls"


def test_batching_off_runs_one_request_per_call(bundle_dir, clf, images):
    app = create_app(_settings(bundle_dir, max_batch=1, max_delay_ms=300), classifier=clf)
    with running_server(app) as url:
        t0 = time.monotonic()
        rs = _post_many(url, [images["png"][0]] * 4)
        assert [r.status_code for r in rs] == [200] * 4
        assert time.monotonic() - t0 < 2  # a full batch (of 1) never waits for max_delay
        m = httpx.get(f"http://{url}/metrics").text
    assert _metric(m, "edgekiln_batch_size_count") == 4


def test_full_queue_is_503_and_timeout_is_503(bundle_dir, clf, images):
    # One request waits 0.8 s for a batch; with a queue of 1 the next is turned away.
    app = create_app(_settings(bundle_dir, max_batch=64, max_delay_ms=800, max_queue=1), classifier=clf)
    with running_server(app) as url:
        with ThreadPoolExecutor(1) as ex:
            first = ex.submit(_post_many, url, [images["png"][0]])
            time.sleep(0.3)
            r = httpx.post(f"http://{url}/v1/classify", content=images["png"][1], timeout=30)
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert "server busy: 1 requests already queued (limit 1)" in r.json()["error"]
            assert first.result()[0].status_code == 200
        assert httpx.post(f"http://{url}/v1/classify", content=images["png"][1], timeout=30).status_code == 200
    app = create_app(_settings(bundle_dir, max_batch=64, max_delay_ms=2000, request_timeout_s=0.2), classifier=clf)
    with running_server(app) as url:
        r = httpx.post(f"http://{url}/v1/classify", content=images["png"][0], timeout=30)
        assert r.status_code == 503 and "request timed out after 0.2 s" in r.json()["error"]


def test_metrics_endpoint(server, images):
    with httpx.Client(base_url=f"http://{server}", timeout=30) as c:
        assert c.post("/v1/classify", content=images["png"][0]).status_code == 200
        assert c.get("/v2/models/nope").status_code == 404
        r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    m = r.text
    assert _metric(m, 'edgekiln_requests_total{code="200",endpoint="classify"}') >= 1
    assert _metric(m, 'edgekiln_requests_total{code="404",endpoint="model_metadata"}') >= 1
    assert _metric(m, 'edgekiln_request_latency_seconds_count{endpoint="classify"}') >= 1
    assert _metric(m, "edgekiln_batch_size_count") >= 1
    assert _metric(m, "edgekiln_queue_depth") == 0


# -------------------------------------------------- the real CLI, in a subprocess


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    return env


def test_cli_serve_finishes_in_flight_requests_on_sigterm(bundle_dir, images):
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "serve", str(bundle_dir), "--host", "127.0.0.1", "--port", str(port),
         "--backend", "cpu", "--max-batch", "64", "--max-delay-ms", "1500"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.2)
        with ThreadPoolExecutor(1) as ex:
            # This request waits ~1.5 s for a batch to fill; SIGTERM arrives while it waits.
            pending = ex.submit(httpx.post, url + "/v1/classify", content=images["png"][0], timeout=30)
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            r = pending.result()
        assert r.status_code == 200 and r.json()["predictions"][0]["label"]
        out, _ = proc.communicate(timeout=30)
        # uvicorn re-raises the signal once it has shut down cleanly (exit status -15), as servers conventionally do.
        assert proc.returncode in (0, -signal.SIGTERM), out
        assert "Waiting for connections to close" in out and "Application shutdown complete" in out
        assert "auto" not in out and "backend 'cpu' (CPUExecutionProvider)" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_serve_refuses_an_unavailable_backend(bundle_dir):
    import onnxruntime as ort

    from pipeline.cli import cli

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has the CUDA provider")
    r = CliRunner().invoke(cli, ["serve", str(bundle_dir), "--backend", "cuda", "--port", "1"])
    assert r.exit_code == 1
    assert r.output.strip().splitlines() == [
        f"error: backend 'cuda' needs onnxruntime's CUDAExecutionProvider, which this install lacks "
        f"(available: {', '.join(ort.get_available_providers())}); install onnxruntime-gpu "
        "(pip install 'edgekiln[gpu]') on a machine with an NVIDIA GPU"
    ]


def test_serving_never_imports_torch(bundle_dir, images):
    code = textwrap.dedent(
        f"""
        import sys
        from click.testing import CliRunner
        import pipeline.cli, pipeline.cli.serve
        import runtime, runtime.serve
        from runtime.serve import ServeSettings, create_app
        assert CliRunner().invoke(pipeline.cli.cli, ["serve", "--help"]).exit_code == 0
        from starlette.testclient import TestClient
        app = create_app(ServeSettings(bundle_dir={str(bundle_dir)!r}, backend="auto"))
        with TestClient(app) as c:  # runs the lifespan: the model loads here
            assert c.get("/v2/health/ready").status_code == 200
            r = c.post("/v1/classify", content=open({str(images['paths'][0])!r}, "rb").read())
            assert r.status_code == 200, r.text
            body = {{"inputs": [{{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [0.1] * 3072}}]}}
            assert c.post("/v2/models/edgekiln/infer", json=body).status_code == 200
        bad = [m for m in sys.modules if m == "torch" or m.startswith("torch.")]
        assert not bad, bad[:5]
        print("ok")
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_serve_self_tests_a_bundle_with_golden_images(run_copy, tiny_data):
    from starlette.testclient import TestClient

    from pipeline.cli import cli
    from tests.test_runtime_backends import _bundle_with_golden

    bundle = _bundle_with_golden(run_copy, tiny_data, shift=0.5)  # golden logits that the model does not produce
    r = CliRunner().invoke(cli, ["serve", str(bundle), "--backend", "cpu", "--artifact", "onnx", "--port", "1"])
    assert r.exit_code == 1
    errors = [line for line in r.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "self-test failed on backend 'cpu' (onnx): max |Δlogit| 5.00e-01" in errors[0]
    assert "Traceback" not in r.output
    bundle = _bundle_with_golden(run_copy, tiny_data)  # correct golden logits: the lifespan self-test passes
    with TestClient(create_app(_settings(bundle, artifact="onnx"))) as c:
        assert c.get("/v2/health/ready").json() == {"ready": True}


def test_serve_serves_the_default_artifact_and_self_tests_it(run_copy, caplog):
    from starlette.testclient import TestClient

    from runtime.bundle import read_bundle

    _, run_dir = run_copy
    bundle = run_dir / "bundle"
    default = read_bundle(bundle).manifest.default_artifact
    assert default == "onnx_int8"  # the tiny run ships its smallest candidate
    with caplog.at_level("INFO", logger="edgekiln"):
        with TestClient(create_app(_settings(bundle))) as c:  # no artifact named
            assert c.get("/v2/health/ready").json() == {"ready": True}
    assert "self-test passed on 4 golden images" in caplog.text and "backend cpu" in caplog.text
    assert f"ready: artifact '{default}' on backend 'cpu'" in caplog.text


def test_model_metadata_names_the_platform_that_runs(bundle_dir, clf):
    """Triton's platform names: an ONNX model is onnxruntime_onnx, a native engine tensorrt_plan."""
    from starlette.testclient import TestClient

    class EngineLike:  # the classifier as the tensorrt-engine backend reports itself
        def __init__(self, inner):
            self.inner, self.backend, self.provider = inner, "tensorrt-engine", "TensorRT 10.0"

        def __getattr__(self, name):
            return getattr(self.inner, name)

    for served, platform in ((clf, "onnxruntime_onnx"), (EngineLike(clf), "tensorrt_plan")):
        with TestClient(create_app(_settings(bundle_dir, self_test=False), classifier=served)) as c:
            meta = c.get(f"/v2/models/{MODEL}").json()
        assert meta["platform"] == platform and meta["parameters"]["backend"] == served.backend
