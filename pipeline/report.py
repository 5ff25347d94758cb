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
