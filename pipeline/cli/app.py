"""The one click group every command module adds its commands to, and the shared option decorators."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgekiln")
@click.option("-v", "--verbose", is_flag=True, help="Log more detail.")
def cli(verbose: bool) -> None:
    """edgekiln: from a pretrained vision model and a folder of labeled images
    to a verified ONNX deployment bundle, in one command.

    Start with `edgekiln demo`, then `edgekiln run DATA_DIR` (one sub-folder per class) or
    `edgekiln run CONFIG.yaml` on your data; `--set key=value` overrides any config field.
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr)


SET_HELP = ("Override one config field, as in the YAML file: --set adapt.strategy=lora "
            "--set export.precisions='[fp32, int8]' (repeatable).")


def set_option(fn):
    """--set key=value (repeatable), applied over the config before validation (`overrides`)."""
    return click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)(fn)


def config_argument(fn):
    """The CONFIG argument (a YAML pipeline config, or a data folder to run with every default)
    and the --set overrides; `load(config, overrides)` reads both."""
    return click.argument("config", type=click.Path(path_type=Path))(set_option(fn))


def bundle_argument(fn):
    """The BUNDLE_DIR argument: a bundle directory (bundle.json + model files)."""
    return click.argument("bundle_dir", type=click.Path(file_okay=False, path_type=Path))(fn)


def load(config: Path, overrides: tuple[str, ...] = ()):
    """The validated PipelineConfig of a YAML file or a data folder, with --set overrides applied
    (ConfigError, one line per problem, when it is not)."""
    from pipeline.config import load_config

    return load_config(config, overrides)


def public_key_option(fn):
    """--public-key (or $EDGEKILN_PUBLIC_KEY): refuse a bundle without a valid signature by this key."""
    from runtime.signing import PUBLIC_KEY_ENV

    return click.option("--public-key", type=click.Path(dir_okay=False, path_type=Path), default=None,
                        envvar=PUBLIC_KEY_ENV, show_envvar=True,
                        help="An Ed25519 public key (edgekiln keygen): refuse the bundle unless it carries a valid "
                             "signature by it (edgekiln sign).")(fn)


def ood_option(fn):
    """--ood/--no-ood: the "unknown" answer of a bundle with an OOD threshold (bundle.json's trust section)."""
    return click.option("--ood/--no-ood", default=True, show_default=True,
                        help="Answer 'unknown' when an image's OOD score is below the bundle's threshold.")(fn)
