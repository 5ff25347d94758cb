"""The adapt-side commands: `edgekiln adapt`, `edgekiln efficiency` and `edgekiln advise`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from pipeline.cli.app import cli, config_argument, load
from pipeline.cli.errors import handle_errors


@cli.command()
@config_argument
@click.option("--resume", is_flag=True, help="Continue an interrupted run from checkpoints/adapt-resume/.")
@handle_errors
def adapt(config: Path, overrides: tuple[str, ...], resume: bool) -> None:
    """Adapt the pretrained model to your data (writes checkpoints/teacher.safetensors).

    The strategy (feature_extraction, finetune, lora) is `adapt.strategy` in the config.
    Ctrl-C leaves a resumable checkpoint: edgekiln adapt my.yaml --resume
    """
    from pipeline.adapt_stage import run_adapt

    echo_adapt_result(run_adapt(load(config, overrides), resume=resume))


def echo_adapt_result(r) -> None:
    """The adapt command's lines for a pipeline.adapt_stage.AdaptResult."""
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports
        return
    line = f"teacher {r.model} ({r.strategy}): test accuracy {r.test_accuracy:.4f}, macro-F1 {r.macro_f1:.4f}"
    if r.auc_roc_ovr is not None:
        line += f", AUC-ROC {r.auc_roc_ovr:.4f}"
    click.echo(line)
    click.echo(f"trainable parameters: {r.trainable_params:,} of {r.params:,} ({r.trainable_fraction:.2%})")
    lo = r.lora
    if lo:
        click.echo(
            f"lora: adapters {lo['adapter_params']:,} = {lo['trainable_fraction_of_backbone']:.2%} of the backbone; "
            f"merged vs adapters max |Δlogit| {lo['merge_max_abs_logit_diff']:.2e}; adapter: {lo['adapter_dir']}"
        )
    for name, b in (r.baselines or {}).items():
        click.echo(f"baseline {name}: test accuracy {b.test_accuracy:.4f}, macro-F1 {b.macro_f1:.4f}")
    from pipeline.domain.explain import domain_lines

    for line in domain_lines(r.to_metrics()):
        click.echo(line)


def _parse_shots(value: str) -> list[int | None]:
    out: list[int | None] = []
    for part in value.split(","):
        part = part.strip().lower()
        if part == "all":
            out.append(None)
        elif part.isdigit() and int(part) > 0:
            out.append(int(part))
        else:
            raise click.BadParameter(f"'{part}' is not a positive number or 'all' (e.g. 5,10,25,50,all)")
    return out


@cli.command()
@config_argument
@click.option("--shots", default="5,10,25,50,all", show_default=True,
              help="Labeled examples per class to train with (comma-separated; 'all' = the whole train split).")
@click.option("--strategies", default=None, help="Comma-separated strategies (default: all registered).")
@click.option("--epochs", type=click.IntRange(1), default=None, help="Epochs per run (default: adapt.epochs).")
@click.option("--min-steps", type=click.IntRange(1), default=30, show_default=True,
              help="Every run trains at least this many optimizer steps (small subsets have few steps per epoch).")
@click.option("--no-scratch", is_flag=True, help="Skip the from-scratch baseline.")
@handle_errors
def efficiency(config: Path, overrides: tuple[str, ...], shots: str, strategies: str | None, epochs: int | None, min_steps: int, no_scratch: bool) -> None:
    """Accuracy against labeled examples per class, for each strategy and from scratch.

    Writes runs/<name>/efficiency.json, efficiency.png and updates report.md.
    Example: edgekiln efficiency my.yaml --shots 5,10,25 --epochs 10
    """
    from rich.console import Console
    from rich.table import Table

    from pipeline.efficiency import data_efficiency
    from pipeline.report import efficiency_table_rows

    cfg = load(config, overrides)
    names = [s.strip() for s in strategies.split(",")] if strategies else None
    res = data_efficiency(cfg, _parse_shots(shots), names, epochs, min_steps, scratch=not no_scratch)
    header, rows = efficiency_table_rows(res)
    table = Table(title=f"test accuracy vs labeled examples per class — {cfg.model.name}")
    for i, col in enumerate(header):
        table.add_column(col, justify="left" if i == 0 else "right", no_wrap=True)
    for r in rows:
        table.add_row(*r)
    Console(width=None if sys.stdout.isatty() else 110).print(table)
    click.echo(f"plot: {cfg.run.root / res['plot']}   data: {cfg.run.efficiency_json}")


@cli.command()
@click.argument("data_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--model", "model_name", default="efficientnet_lite0", show_default=True, help="Model to probe.")
@click.option("--weights", default="default", show_default=True, help="'default', 'none' or a weights file.")
@click.option("--input-size", type=click.IntRange(16, 1024), default=None, help="Input side (default: the model's).")
@click.option("--crop-pct", type=click.FloatRange(0, 1, min_open=True), default=None, help="Center-crop fraction.")
@click.option("--tight-budget", is_flag=True, help="Compute or memory is tight (favours LoRA over full fine-tuning).")
@click.option("--seed", default=0, show_default=True)
@click.option("--target", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="A folder of unlabeled images from the deployment camera: measure the domain gap.")
@click.option("--json", "as_json", is_flag=True, help="Print the advice as JSON.")
@handle_errors
def advise(data_dir: Path, model_name: str, weights: str, input_size: int | None, crop_pct: float | None,
           tight_budget: bool, seed: int, target: Path | None, as_json: bool) -> None:
    """Look at an ImageFolder, probe the pretrained features, and recommend a strategy (and, with
    --target, a domain method).

    Example: edgekiln advise ~/my_images --input-size 96 --target ~/device_images
    """
    import json

    from pipeline.advise import advise as run_advise

    a = run_advise(data_dir, model_name, weights, input_size, crop_pct, tight_budget, seed, target)
    if as_json:
        click.echo(json.dumps(a.to_dict(), indent=2))
        return
    s = a.stats
    counts = sorted(s.per_class.values())
    click.echo(f"data: {s.images} images, {s.classes} classes, {counts[0]}-{counts[-1]} per class "
               f"(imbalance {s.imbalance:.1f}x)")
    click.echo(f"image sizes: width {s.width[0]}/{s.width[1]}/{s.width[2]}, height {s.height[0]}/{s.height[1]}/{s.height[2]} "
               f"(min/median/max); modes {', '.join(f'{k}: {v}' for k, v in s.modes.items())}")
    click.echo(f"linear probe ({a.model}, input {a.input_size}): validation accuracy {a.probe_val_accuracy:.4f}")
    click.echo(f"recommendation: {a.recommendation}")
    for r in a.reasons:
        click.echo(f"  - {r}")
    for n in a.notes:
        click.echo(f"note: {n}")
    d = a.domain
    if d:
        click.echo(f"domain gap ({d['target_images']} target images): {d['describe']}")
        click.echo(f"  meaning: {d['meaning']}")
        click.echo(f"  domain method: {d['method']} ({d['reason']})")
    click.echo(f"config:\n  adapt:\n    strategy: {a.recommendation}" + (f"\n    domain: {d['method']}" if d else ""))
