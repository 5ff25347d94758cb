"""`edgekiln predict`: classify image files with a bundle (the torch-free runtime)."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.cli.app import bundle_argument, cli, ood_option, public_key_option
from pipeline.cli.errors import handle_errors


@cli.command()
@bundle_argument
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--top-k", default=1, show_default=True, type=click.IntRange(1, 100), help="Classes to show per image.")
@ood_option
@public_key_option
@handle_errors
def predict(bundle_dir: Path, images: tuple[Path, ...], top_k: int, ood: bool, public_key: Path | None) -> None:
    """Classify image files with a bundle (torch-free runtime). One line per image: the file, the label
    (or `unknown` when the OOD score is below the bundle's threshold), the calibrated probability of the
    best class, the OOD score when the bundle has one, and with --top-k the best classes. A multilabel
    bundle prints the file, its label set (comma-separated, `-` when empty) and every label's probability.

    Example: edgekiln predict runs/demo/bundle photo1.jpg photo2.png --top-k 3
    """
    import runtime

    clf = runtime.load(bundle_dir, public_key=public_key, ood=ood)
    if clf.multilabel is not None:
        for path, p in zip(images, clf.predict(list(images))):
            probs = "  ".join(f"{label}:{prob:.3f}" for label, prob in p.probabilities.items())
            click.echo(f"{path}\t{','.join(p.labels) or '-'}\t{probs}")
        return
    for path, p in zip(images, clf.predict(list(images), top_k=top_k)):
        alts = "  ".join(f"{label}:{prob:.3f}" for label, prob in p.top_k)
        score = f"\tscore {p.score:.3f}" if p.score is not None else ""
        click.echo(f"{path}\t{p.label}\t{p.probability:.4f}{score}" + (f"\t{alts}" if top_k > 1 else ""))
