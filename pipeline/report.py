"""Run summaries printed at the end of `demo` / `run`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def summary_rows(metrics: dict[str, Any]) -> list[tuple[str, ...]]:
    rows = []
    v = metrics.get("validate", {})
    for key in ("teacher", "student"):
        m = metrics.get(key)
        if m:
            rows.append((key, m["model"], f"{m['test_accuracy']:.4f}", f"{m['size_mb']:.2f}", "—", "—"))
    o = metrics.get("onnx")
    if o:
        agree = v.get("agreement", o["agreement"])
        diff = v.get("max_abs_logit_diff", o["max_abs_logit_diff"])
        rows.append(("ONNX", f"{o['role']}, fp32, opset {o['opset']}", f"{v.get('artifact_accuracy', o['accuracy']):.4f}",
                     f"{o['size_mb']:.2f}", f"{agree:.2%}", f"{diff:.2e}"))
    return rows


def print_summary(metrics: dict[str, Any], run_dir: Path, console: Console | None = None) -> None:
    console = console or Console(width=None if sys.stdout.isatty() else 110)
    table = Table(title=f"edgekiln summary — {run_dir}")
    for col in ("", "model", "test accuracy", "size MB", "top-1 agreement", "max |Δlogit|"):
        table.add_column(col, justify="left" if col in ("", "model") else "right", no_wrap=True)
    for row in summary_rows(metrics):
        table.add_row(*row)
    console.print(table)
    console.print(f"bundle: {run_dir / 'bundle'}   metrics: {run_dir / 'metrics.json'}")


def distill_rows(m: dict[str, Any]) -> list[tuple[str, str]]:
    """The distill justification as (what, value) rows."""
    rows = [
        ("student", m["model"]),
        ("teacher", m["teacher_model"]),
        ("test accuracy (student / teacher)", f"{m['test_accuracy']:.4f} / {m['teacher_test_accuracy']:.4f}"),
        ("accuracy retained", f"{m['accuracy_retained']:.1%}"),
        ("parameters (student / teacher)", f"{m['params']:,} / {m['teacher_params']:,} ({m['params_ratio']:.1%})"),
    ]
    c = m.get("onnx_cost")
    if c:
        s, t = c["student"], c["teacher"]
        rows += [
            ("ONNX size MB", f"{s['size_mb']:.2f} / {t['size_mb']:.2f} ({m['onnx_size_ratio']:.1%})"),
            ("ORT CPU latency batch 1, ms", f"{s['latency_b1_ms']:.2f} / {t['latency_b1_ms']:.2f} ({m['latency_b1_ratio']:.1%})"),
            ("ORT CPU latency batch 32, ms", f"{s['latency_b32_ms']:.1f} / {t['latency_b32_ms']:.1f} ({m['latency_b32_ratio']:.1%})"),
        ]
    if "without_kd" in m:
        rows.append(("same student without KD", f"{m['without_kd']['test_accuracy']:.4f} (KD gain {m['kd_gain']:+.4f})"))
    if "auto" in m:
        fits = [r["student"] for r in m["auto"]["candidates"] if r["fits"]]
        rows.append(("auto: fitting candidates", ", ".join(fits)))
        rows.append(("auto: trained", ", ".join(m["auto"]["trained"])))
    return rows


def print_distill_report(m: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console(width=None if sys.stdout.isatty() else 110)
    table = Table(title="distillation: what the student keeps and costs")
    table.add_column("")
    table.add_column("student / teacher", no_wrap=True)
    for row in distill_rows(m):
        table.add_row(*row)
    console.print(table)
