"""`edgekiln bench BUNDLE`: one row per artifact × backend × precision hint available here
(each artifact on every backend its bundle.json `runtimes` lists that can start here; OpenVINO at
the artifact's own inference precision and, on a CPU with bf16, at bf16 too), with the
format, precision, size, accuracy and top-1 agreement (from the parity gate
recorded at export, on the held-out test split), latency p50/p95 at batch 1,
throughput at batch 32, and a ✅/❌ parity status (the artifact's gate, which ran it on its first
backend at its own precision; other rows show — : not gated).

Latencies of different artifacts are measured side by side in one process, in
alternating blocks (A×n, B×n, C×n, A×n, ...), so a noisy neighbour on a shared
CPU slows every artifact alike and the ratios stay meaningful.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from runtime.backends import session_for_artifact
from runtime.bundle import Bundle, read_bundle
from runtime.files import atomic_write_text
from runtime.preprocess import preprocess


@dataclass
class BenchRow:
    artifact: str
    format: str
    precision: str
    backend: str
    size_mb: float
    accuracy: float | None
    agreement: float | None
    latency_p50_ms: float
    latency_p95_ms: float
    throughput_ips: float
    parity: bool | None
    hint: str = ""  # OpenVINO inference precision (f32, bf16, f16); "" for onnxruntime and engines

    @property
    def parity_mark(self) -> str:
        return "—" if self.parity is None else ("✅" if self.parity else "❌")


def artifact_bytes(bundle: Bundle, key: str) -> int:
    f = bundle.path(key)
    data = f.with_suffix(".bin") if f.suffix == ".xml" else f.with_name(f.name + ".data")  # IR / external weights
    return f.stat().st_size + (data.stat().st_size if data.exists() else 0)


_LABELS = {"cpu": "onnxruntime-cpu", "cuda": "onnxruntime-cuda", "tensorrt": "onnxruntime-tensorrt"}


def _runnable(bundle: Bundle, key: str, threads: int | None) -> list[tuple[str, str, str, Any]]:
    """(row id, backend label, hint, Session or the reason it cannot run) for each backend × hint of
    artifact `key`: its first runtime always (a row saying why when it cannot run), the others
    when they start here."""
    from runtime.backends import OpenVINOOptions
    from runtime.backends.openvino import default_precision, supported_precisions

    art = bundle.artifact(key)
    out: list[tuple[str, str, str, Any]] = []
    for i, backend in enumerate(art.runtimes):
        hints = [""]
        if backend == "openvino":
            own = default_precision(art.precision)
            hints = [own] + [h for h in ("bf16",) if h != own and h in supported_precisions()]
        for hint in hints:
            try:
                opts = OpenVINOOptions(precision=hint) if hint else None
                sess: Any = session_for_artifact(bundle, key, backend=backend, intra_op_threads=threads, options=opts)
            except Exception as e:  # e.g. no GPU or no tensorrt here: benchmark the rest, say why
                if i == 0:
                    out.append((key, f"unavailable ({str(e).splitlines()[0][:80]})", hint, None))
                continue
            label = f"openvino-{sess.options.device}" if backend == "openvino" else _LABELS.get(backend, art.format)
            rid = key if i == 0 and hint in ("", default_precision(art.precision)) else f"{key}@{backend}:{hint or '-'}"
            out.append((rid, label, hint, sess))
    return out


def timing_inputs(bundle: Bundle, n: int) -> np.ndarray:
    """Real images when the bundle has golden ones (repeated to n), else a fixed random batch."""
    spec = bundle.preprocess
    if bundle.manifest.golden:
        x = preprocess(bundle.golden()[1], spec)
        return np.concatenate([x] * (n // len(x) + 1))[:n]
    return np.random.default_rng(0).standard_normal((n, 3, *spec.hw)).astype(np.float32)


def alternating_latency(runners: dict[str, Callable], x: np.ndarray, blocks: int = 10, per_block: int = 20,
                        warmup: int = 3) -> dict[str, list[float]]:
    """Seconds per call of each runner on `x`, timed in alternating blocks: A×per_block, B×per_block,
    ..., repeated `blocks` times, each block after `warmup` untimed calls.

    Why blocks and not call-by-call interleaving (A, B, A, B, ...): every onnxruntime session owns a
    thread pool whose workers keep spinning for a while after a run. Interleaved call by call, each
    session runs while the other's workers still spin, and on a small CPU that penalises whichever
    runs second by up to 2× (measured here on 2 cores). Blocks give each session the CPU in its
    own steady state; alternating them still spreads load drift over all runners alike.
    """
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(blocks):
        for k, run in runners.items():
            for _ in range(warmup):
                run(x)
            for _ in range(per_block):
                t0 = time.perf_counter()
                run(x)
                times[k].append(time.perf_counter() - t0)
    return times


def bench_bundle(bundle_dir: Path, rounds: int = 200, throughput_batch: int = 32,
                 throughput_rounds: int = 10, threads: int | None = None) -> list[BenchRow]:
    """Benchmark every artifact of a bundle that can run here, each on the runtime backend its format
    needs (runtime.backends.session_for_artifact: ONNX on onnxruntime's CPU provider with `threads`
    intra-op threads; TensorRT engines where tensorrt and a matching GPU are present)."""
    bundle = read_bundle(bundle_dir, verify=True)
    arts = bundle.manifest.artifacts
    plan = [(key, *r) for key in arts for r in _runnable(bundle, key, threads)]
    runners: dict[str, Callable] = {rid: sess.run for _, rid, _, _, sess in plan if sess is not None}
    x1 = timing_inputs(bundle, 1)
    xb = timing_inputs(bundle, throughput_batch)
    blocks = min(10, rounds)
    lat = alternating_latency(runners, x1, blocks=blocks, per_block=rounds // blocks)
    # Throughput from the median batch time, in two alternating blocks per artifact.
    tb = alternating_latency(runners, xb, blocks=2, per_block=max(1, throughput_rounds // 2), warmup=1)
    thr = {k: throughput_batch / float(np.median(v)) for k, v in tb.items()}
    rows = []
    for key, rid, label, hint, _ in plan:
        art = arts[key]
        p = (art.parity or {}) if rid == key else {}  # the gate ran the artifact on its first backend only
        t = np.asarray(lat.get(rid, [np.nan])) * 1e3
        rows.append(BenchRow(
            artifact=key, format=art.format, precision=art.precision, backend=label,
            size_mb=artifact_bytes(bundle, key) / 1e6,
            accuracy=p.get("artifact_accuracy"), agreement=p.get("agreement"),
            latency_p50_ms=float(np.percentile(t, 50)), latency_p95_ms=float(np.percentile(t, 95)),
            throughput_ips=float(thr.get(rid, np.nan)), parity=p.get("passed"), hint=hint,
        ))
    return rows


def ratios(rows: list[BenchRow], base: str = "onnx") -> dict[str, dict[str, float]]:
    """Latency (p50, batch 1) and size of each artifact (on its first backend) relative to `base` (the FP32 ONNX)."""
    by = {r.artifact: r for r in reversed(rows)}  # each artifact's first row: its first backend
    if base not in by:
        return {}
    b = by[base]
    return {r.artifact: {"latency_p50": r.latency_p50_ms / b.latency_p50_ms, "size": r.size_mb / b.size_mb}
            for r in rows if r.artifact != base and np.isfinite(r.latency_p50_ms)}


_ONNX_OF = {"fp32": "onnx", "bf16": "onnx", "fp16": "onnx_fp16", "int8": "onnx_int8"}


def openvino_ratios(rows: list[BenchRow]) -> dict[str, float]:
    """OpenVINO / onnxruntime latency (p50, batch 1), measured side by side: each OpenVINO row against
    onnxruntime's CPU row of the same ONNX artifact, or for an IR the ONNX artifact of its precision."""
    cpu = {r.artifact: r for r in rows if r.backend == "onnxruntime-cpu"}
    out = {}
    for r in rows:
        if not r.backend.startswith("openvino") or not np.isfinite(r.latency_p50_ms):
            continue
        base = cpu.get(r.artifact) or cpu.get(_ONNX_OF.get(r.precision, "onnx")) or cpu.get("onnx")
        if base is not None and np.isfinite(base.latency_p50_ms):
            out[f"{r.artifact} on {r.backend} ({r.hint}) / {base.artifact} on onnxruntime-cpu"] = (
                r.latency_p50_ms / base.latency_p50_ms)
    return out


def write_outputs(rows: list[BenchRow], out_prefix: Path, title: str = "") -> tuple[Path, Path | None]:
    """<prefix>.json (rows + ratios) and <prefix>.png (accuracy vs latency), when matplotlib is installed."""
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {"rows": [{**asdict(r), "parity_mark": r.parity_mark} for r in rows], "ratios": ratios(rows),
                            "openvino_ratios": openvino_ratios(rows)}
    json_path = out_prefix.with_suffix(".json")
    atomic_write_text(json_path, json.dumps(data, indent=2, allow_nan=True) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return json_path, None
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for r in rows:
        if r.accuracy is None or not np.isfinite(r.latency_p50_ms):
            continue
        ax.scatter(r.latency_p50_ms, r.accuracy * 100, s=40 + 8 * r.size_mb,
                   color="tab:green" if r.parity else "tab:red", alpha=0.8)
        ax.annotate(f"{r.format} {r.precision}\n{r.size_mb:.1f} MB", (r.latency_p50_ms, r.accuracy * 100),
                    textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.margins(x=0.3, y=0.25)  # room for the labels
    ax.set_xlabel("latency p50, batch 1 (ms)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title or "edgekiln bench: accuracy vs latency (green = parity passed)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png_path = out_prefix.with_suffix(".png")
    fig.savefig(png_path)
    plt.close(fig)
    return json_path, png_path
