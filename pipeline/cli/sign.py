"""`edgekiln keygen` and `edgekiln sign`: an Ed25519 key pair, and a detached signature over a bundle's
bundle.json (runtime.signing), which `predict`/`serve --public-key` and `runtime.load(public_key=...)`
check."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.cli.app import bundle_argument, cli
from pipeline.cli.errors import handle_errors


@cli.command()
@click.argument("name", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--force", is_flag=True, default=False, help="Overwrite NAME.key / NAME.pub if they exist.")
@handle_errors
def keygen(name: Path, force: bool) -> None:
    """Make an Ed25519 key pair: NAME.key (private, mode 0600; keep it off the edge box) and NAME.pub.

    Example: edgekiln keygen keys/edgekiln
    """
    from runtime.signing import write_key_pair

    private, public = write_key_pair(name, overwrite=force)
    click.echo(f"private key: {private}\npublic key:  {public}")


@cli.command()
@bundle_argument
@click.option("--key", "key", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The Ed25519 private key (PEM, from `edgekiln keygen`).")
@handle_errors
def sign(bundle_dir: Path, key: Path) -> None:
    """Sign a bundle: a detached Ed25519 signature over bundle.json (which pins every file's sha256),
    written to BUNDLE_DIR/bundle.json.sig. The bundle's files are verified first.

    Example: edgekiln sign runs/demo/bundle --key keys/edgekiln.key
    """
    from runtime.signing import sign_bundle

    click.echo(f"signed: {sign_bundle(bundle_dir, key)}")
