"""`edgekiln check-data`: every problem of a data set in one pass, as a table and a JSON report."""

from __future__ import annotations

import json
from pathlib import Path

import click

from pipeline.cli.app import cli, load, set_option
from pipeline.cli.errors import fail, handle_errors
from runtime.files import atomic_write_text


@cli.command("check-data")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@set_option
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the report as JSON here.")
@handle_errors
def check_data_cmd(source: Path, overrides: tuple[str, ...], json_out: Path | None) -> None:
    """Check a data set before training: a folder of class sub-folders, a CSV/JSONL manifest, or a
    YAML config (its `data` section). Finds, in one pass, unreadable / corrupt / truncated / empty
    files, non-image files, identical and near-identical images within a class, across classes
    and across the split, classes too small for the split, imbalance, EXIF rotation, and sums up
    sizes, modes and formats. Exits 1 when a problem would break or bias training.

    Example: edgekiln check-data ./images --json data_check.json --set data.test_fraction=0.3
    """
    from pipeline.datacheck import check_data, print_report

    cfg = load(source, overrides)
    report = check_data(cfg.data, seed=cfg.seed)
    print_report(report)
    if json_out is not None:
        atomic_write_text(json_out, json.dumps(report.to_dict(), indent=1) + "\n")
    if report.errors:
        fail(f"{len(report.errors)} problem(s) would break or bias training (table above)", 1)
