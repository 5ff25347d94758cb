"""edgekiln's command line. Each command parses options, calls one library
function from pipeline.stages, and turns domain errors into one-line messages.

    edgekiln demo                      # the whole pipeline on the built-in digits data
    edgekiln run pipeline.yaml         # the whole pipeline on your data
    edgekiln predict runs/demo/bundle img1.png img2.png
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from pipeline.cli_errors import _fail, handle_errors

log = logging.getLogger("edgekiln")


def config_argument(fn):
    return click.argument("config", type=click.Path(dir_okay=False, path_type=Path))(fn)


def _load(config: Path):
    from pipeline.config import load_config

    return load_config(config)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgekiln")
@click.option("-v", "--verbose", is_flag=True, help="Log more detail.")
def cli(verbose: bool) -> None:
    """edgekiln: from a pretrained vision model and a folder of labeled images
    to a verified ONNX deployment bundle, in one command.

    Start with `edgekiln demo`, then `edgekiln run CONFIG.yaml` on your data.
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr)


@cli.command()
@click.option("--runs-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs"), show_default=True,
              help="Where run directories are written.")
@click.option("--name", default="demo", show_default=True, help="Run name (runs/<name>/).")
@click.option("--student-epochs", type=click.IntRange(1), default=None, help="Distillation epochs (default: 15).")
@handle_errors
def demo(runs_dir: Path, name: str, student_epochs: int | None) -> None:
    """Run the whole pipeline on the built-in digits data set.

    EfficientNet-Lite0 (ImageNet weights) is adapted by feature extraction,
    distilled into MobileNetV3-Small, exported to ONNX and parity-checked.
    Works offline. Example: edgekiln demo --runs-dir /tmp/runs
    """
    from pipeline.config import demo_config

    cfg = demo_config(runs_dir=runs_dir, name=name)
    if student_epochs:
        cfg.distill.epochs = student_epochs
    _run(cfg)


@cli.command()
@config_argument
@handle_errors
def run(config: Path) -> None:
    """Run every stage (adapt, distill, export, validate) from a YAML config.

    Example: edgekiln run configs/example.yaml
    """
    _run(_load(config))


def _run(cfg) -> None:
    from pipeline.report import print_summary
    from pipeline.stages import run_pipeline

    click.echo(f"edgekiln: run '{cfg.name}' -> {cfg.run_dir}", err=True)
    out = run_pipeline(cfg)
    print_summary(out["metrics"], cfg.run)
    report = out["parity"]
    if not report.passed:
        _fail("parity check failed: " + "; ".join(report.failures), 1)


@cli.command()
@config_argument
@click.option("--resume", is_flag=True, help="Continue an interrupted run from checkpoints/adapt-resume/.")
@handle_errors
def adapt(config: Path, resume: bool) -> None:
    """Adapt the pretrained model to your data (writes checkpoints/teacher.safetensors).

    The strategy (feature_extraction, finetune, lora) is `adapt.strategy` in the config.
    Ctrl-C leaves a resumable checkpoint: edgekiln adapt my.yaml --resume
    """
    from pipeline.adapt_stage import run_adapt
    from pipeline.cli_adapt import echo_adapt_result

    echo_adapt_result(run_adapt(_load(config), resume=resume))


@cli.command()
@config_argument
@click.option("--student", default=None, help="Student model name, or 'auto' (overrides distill.student).")
@click.option("--max-latency-ms", type=float, default=None, help="With --student auto: ONNX Runtime CPU batch-1 budget.")
@click.option("--max-size-mb", type=float, default=None, help="With --student auto: ONNX file size budget.")
@click.option("--compare-without-kd", is_flag=True, default=None, help="Also train the student without KD.")
@handle_errors
def distill(config: Path, student, max_latency_ms, max_size_mb, compare_without_kd) -> None:
    """Distill the adapted teacher into a smaller student (writes checkpoints/student.safetensors).

    Prints what the student keeps and costs relative to the teacher. Example:
    edgekiln distill my.yaml --student auto --max-latency-ms 5 --max-size-mb 4
    """
    from pipeline.distill_stage import run_distill
    from pipeline.report import print_distill_report

    cfg = _load(config)
    overrides = {"student": student, "max_latency_ms": max_latency_ms, "max_size_mb": max_size_mb,
                 "compare_without_kd": compare_without_kd}
    for key, value in overrides.items():
        if value is not None:
            setattr(cfg.distill, key, value)
    print_distill_report(run_distill(cfg))


@cli.command()
@click.argument("bundle_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--top-k", default=1, show_default=True, type=click.IntRange(1, 100), help="Classes to show per image.")
@handle_errors
def predict(bundle_dir: Path, images: tuple[Path, ...], top_k: int) -> None:
    """Classify image files with a bundle (torch-free runtime).

    Example: edgekiln predict runs/demo/bundle photo1.jpg photo2.png --top-k 3
    """
    import runtime

    clf = runtime.load(bundle_dir)
    for path, p in zip(images, clf.predict(list(images), top_k=top_k)):
        alts = "  ".join(f"{label}:{prob:.3f}" for label, prob in p.top_k)
        click.echo(f"{path}\t{p.label}\t{p.probability:.4f}" + (f"\t{alts}" if top_k > 1 else ""))


from pipeline.cli_serve import serve; cli.add_command(serve)  # noqa: E402,E702
from pipeline.cli_export import register as _register_export; _register_export(cli)  # noqa: E402,E702
from pipeline.cli_adapt import register as _register_adapt_commands  # noqa: E402
_register_adapt_commands(cli)  # `efficiency` and `advise`


def main() -> None:
    cli(prog_name="edgekiln")


if __name__ == "__main__":
    main()
