"""`edgekiln serve`: the bundle behind an HTTP server (torch-free; runtime.serve)."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.cli.app import bundle_argument, cli, ood_option, public_key_option
from pipeline.cli.errors import handle_errors


@cli.command()
@bundle_argument
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0 for every interface, e.g. in a container).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--backend", default="auto", show_default=True,
              type=click.Choice(["auto", "cpu", "cuda", "tensorrt", "tensorrt-engine", "openvino"]),
              help="Inference backend; a named one that cannot run here is an error, never a fallback "
                   "(but see --allow-engine-fallback).")
@click.option("--allow-engine-fallback", is_flag=True, default=False,
              help="With --backend tensorrt-engine: when the bundle's TensorRT engine cannot run here (no engine, "
                   "no TensorRT or GPU, or another TensorRT version, GPU or compute capability than it was built "
                   "for), serve the bundle's ONNX model on the best onnxruntime backend instead, with a warning.")
@click.option("--artifact", default=None,
              help="The bundle artifact to serve (onnx, onnx_int8, openvino, ...: bundle.json's artifacts). "
                   "Default: the bundle's default artifact, the deployable export chose by measurement.")
@click.option("--openvino-device", default=None, help="--backend openvino: CPU, GPU, NPU or AUTO (default CPU).")
@click.option("--openvino-precision", default=None,
              help="--backend openvino: inference precision f32, bf16 or f16 (default: the artifact's; f32).")
@click.option("--openvino-hint", default=None, help="--backend openvino: latency (default) or throughput.")
@click.option("--openvino-streams", default=None, type=click.IntRange(1), help="--backend openvino: streams.")
@click.option("--max-batch", default=32, show_default=True, type=click.IntRange(1, 1024),
              help="Images per model call; 1 turns dynamic batching off.")
@click.option("--max-delay-ms", default=5.0, show_default=True, type=click.FloatRange(0, 10_000),
              help="Longest a request waits for others to batch with.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Server processes, each with its own copy of the model.")
@click.option("--threads", "intra_op_threads", default=None, type=click.IntRange(1, 1024),
              help="onnxruntime intra-op threads (default: onnxruntime's choice).")
@click.option("--model-name", default="edgekiln", show_default=True, help="Model name in /v2/models/{name}.")
@click.option("--max-queue", default=256, show_default=True, type=click.IntRange(1),
              help="Requests that may wait for the model; more get 503.")
@click.option("--max-body-mb", default=32.0, show_default=True, type=click.FloatRange(0.001),
              help="Largest request body (413 beyond).")
@click.option("--max-megapixels", default=50.0, show_default=True, type=click.FloatRange(0.001),
              help="Largest decoded image (decompression-bomb guard; 413 beyond).")
@click.option("--timeout-s", "request_timeout_s", default=30.0, show_default=True, type=click.FloatRange(0.001),
              help="Longest a request waits for the model (503 beyond).")
@click.option("--access-log/--no-access-log", default=False, show_default=True, help="Log every request.")
@ood_option
@public_key_option
@handle_errors
def serve(bundle_dir: Path, host: str, port: int, backend: str, allow_engine_fallback: bool, artifact: str | None,
          openvino_device: str | None, openvino_precision: str | None, openvino_hint: str | None,
          openvino_streams: int | None, max_batch: int,
          max_delay_ms: float, workers: int, intra_op_threads: int | None, model_name: str, max_queue: int,
          max_body_mb: float, max_megapixels: float, request_timeout_s: float, access_log: bool, ood: bool,
          public_key: Path | None) -> None:
    """Serve a bundle over HTTP: the Open Inference Protocol v2 (KServe/Triton
    clients), POST /v1/classify for encoded images, Prometheus /metrics.

    Example: edgekiln serve runs/demo/bundle --port 8000 --max-batch 32 --max-delay-ms 5
    """
    from pydantic import ValidationError

    from runtime.errors import ConfigError
    from runtime.serve import ServeSettings, serve as run_server

    if allow_engine_fallback and backend != "tensorrt-engine":
        raise ConfigError(f"--allow-engine-fallback applies only to --backend tensorrt-engine "
                          f"(got --backend {backend})")

    ov = {"openvino_device": openvino_device, "openvino_precision": openvino_precision,
          "openvino_hint": openvino_hint, "openvino_streams": openvino_streams}
    if backend != "openvino" and any(v is not None for v in ov.values()):
        raise ConfigError(f"--openvino-* options apply only to --backend openvino (got --backend {backend})")
    try:
        settings = ServeSettings(
            bundle_dir=str(bundle_dir), backend=backend, allow_engine_fallback=allow_engine_fallback,
            artifact=artifact, **ov,
            model_name=model_name, intra_op_threads=intra_op_threads,
            max_batch=max_batch, max_delay_ms=max_delay_ms, max_queue=max_queue,
            max_body_bytes=int(max_body_mb * 2**20), max_pixels=int(max_megapixels * 1e6),
            request_timeout_s=request_timeout_s, ood=ood, public_key=str(public_key) if public_key else None,
        )
    except ValidationError as e:
        raise ConfigError("; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())) from None
    settings.backend_options()  # a bad --openvino-* value: one line now, not in a worker
    if public_key:  # an unsigned bundle or a bad signature: one line now, not in a worker
        from runtime.bundle import read_bundle

        read_bundle(bundle_dir, verify=False, public_key=public_key)
    run_server(settings, host=host, port=port, workers=workers, access_log=access_log)
