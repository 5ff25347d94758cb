"""`edgekiln demo` and `edgekiln run`: every stage, adapt to validate, in one command."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.cli.app import cli, config_argument, load, set_option
from pipeline.cli.errors import fail, handle_errors


@cli.command()
@click.option("--runs-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs"), show_default=True,
              help="Where run directories are written.")
@click.option("--name", default="demo", show_default=True, help="Run name (runs/<name>/).")
@click.option("--student-epochs", type=click.IntRange(1), default=None, help="Distillation epochs (default: 15).")
@click.option("--ood", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="A folder of images that are not digits (data.ood): the OOD score's AUROC and FPR at 95% TPR "
                   "are measured on them (python bench/ood_images.py DIR writes one).")
@set_option
@handle_errors
def demo(runs_dir: Path, name: str, student_epochs: int | None, ood: Path | None, overrides: tuple[str, ...]) -> None:
    """Run the whole pipeline on the built-in digits data set.

    EfficientNet-Lite0 (ImageNet weights) is adapted by feature extraction and
    distilled into MobileNetV3-Small; both are exported to ONNX FP32 and INT8,
    parity-checked, measured here, and the best is shipped (the table at the end
    marks it and says why). Works offline. Example: edgekiln demo --runs-dir /tmp/runs
    """
    from pipeline.config import build_config, demo_config

    cfg = demo_config(runs_dir=runs_dir, name=name)
    if overrides:
        cfg = build_config(cfg.model_dump(mode="json", by_alias=True, exclude_unset=True), "demo", overrides)
    if student_epochs:
        cfg.distill.epochs = student_epochs
    if ood:
        cfg.data.ood = ood.resolve()
    _run(cfg)


@cli.command()
@config_argument
@handle_errors
def run(config: Path, overrides: tuple[str, ...]) -> None:
    """Run every stage (adapt, distill, export, validate) from a YAML config, or from a folder of
    images (one sub-folder per class) with every default; ends with every artifact's figures, the
    deployable marked, and a one-line verdict. The run directory keeps the resolved config.yaml.
    Exits 1 when no candidate passed its gate and met the `deploy` budgets.

    Examples: edgekiln run ./images --set distill.enabled=false
              edgekiln run configs/example.yaml
    """
    _run(load(config, overrides))


def _run(cfg) -> None:
    from exporters.deploy import DeployError
    from pipeline.report import print_summary
    from pipeline.stages import run_pipeline

    click.echo(f"edgekiln: run '{cfg.name}' -> {cfg.run_dir}", err=True)
    try:
        out = run_pipeline(cfg)
    except DeployError as e:
        click.echo(e.table, err=True)
        fail(str(e), e.exit_code)
    print_summary(out, cfg.run)
    report = out.parity
    if not report.passed:
        fail("parity check failed: " + "; ".join(report.failures), 1)
