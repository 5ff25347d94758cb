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
    from runtime.errors import ImageError

    clf = runtime.load(bundle_dir, public_key=public_key, ood=ood)
    failed = 0
    for path, p in _each(clf, list(images), top_k):
        if isinstance(p, ImageError) and len(images) == 1:
            raise p
        if isinstance(p, ImageError):  # said on its own line; the other images still get their answer
            failed += 1
            click.echo(f"error: {p}", err=True)
        elif clf.multilabel is not None:
            probs = "  ".join(f"{label}:{prob:.3f}" for label, prob in p.probabilities.items())
            click.echo(f"{path}\t{','.join(p.labels) or '-'}\t{probs}")
        else:
            alts = "  ".join(f"{label}:{prob:.3f}" for label, prob in p.top_k)
            score = f"\tscore {p.score:.3f}" if p.score is not None else ""
            click.echo(f"{path}\t{p.label}\t{p.probability:.4f}{score}" + (f"\t{alts}" if top_k > 1 else ""))
    if failed:
        raise ImageError(f"{failed} of {len(images)} image(s) could not be read (each is named above)")


def _each(clf, paths: list[Path], top_k: int, chunk: int = 32):
    """(path, Prediction or the ImageError that image raised), a chunk of images per call; a chunk with an
    unreadable image is retried one image at a time, so one bad file does not cost the others their answer."""
    from runtime.errors import ImageError

    kw = {} if clf.multilabel is not None else {"top_k": top_k}
    for i in range(0, len(paths), chunk):
        part = paths[i : i + chunk]
        try:
            yield from zip(part, clf.predict(part, **kw))
        except ImageError:
            for path in part:
                try:
                    yield path, clf.predict([path], **kw)[0]
                except ImageError as e:
                    yield path, e
