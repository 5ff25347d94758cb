"""`edgekiln distill`: the adapted teacher into a smaller student, with what it keeps and costs."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.cli.app import cli, config_argument, load
from pipeline.cli.errors import handle_errors


@cli.command()
@config_argument
@click.option("--student", default=None, help="Student model name, or 'auto' (overrides distill.student).")
@click.option("--max-latency-ms", type=float, default=None, help="With --student auto: ONNX Runtime CPU batch-1 budget.")
@click.option("--max-size-mb", type=float, default=None, help="With --student auto: ONNX file size budget.")
@click.option("--compare-without-kd", is_flag=True, default=None, help="Also train the student without KD.")
@handle_errors
def distill(config: Path, overrides: tuple[str, ...], student, max_latency_ms, max_size_mb, compare_without_kd) -> None:
    """Distill the adapted teacher into a smaller student (writes checkpoints/student.safetensors).

    Prints what the student keeps and costs relative to the teacher. Example:
    edgekiln distill my.yaml --student auto --max-latency-ms 5 --max-size-mb 4
    """
    from pipeline.distill_stage import run_distill
    from pipeline.report import print_distill_report

    cfg = load(config, overrides)
    flags = {"student": student, "max_latency_ms": max_latency_ms, "max_size_mb": max_size_mb,
                 "compare_without_kd": compare_without_kd}
    for key, value in flags.items():
        if value is not None:
            setattr(cfg.distill, key, value)
    print_distill_report(run_distill(cfg))
