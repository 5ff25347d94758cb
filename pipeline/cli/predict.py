"""`edgekiln predict`: classify image files with a bundle (the torch-free runtime)."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.cli.app import bundle_argument, cli
from pipeline.cli.errors import handle_errors


@cli.command()
@bundle_argument
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
