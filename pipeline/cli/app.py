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

    Start with `edgekiln demo`, then `edgekiln run CONFIG.yaml` on your data.
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr)


def config_argument(fn):
    """The CONFIG argument: a YAML pipeline config (pipeline.config.load_config reads it)."""
    return click.argument("config", type=click.Path(dir_okay=False, path_type=Path))(fn)


def bundle_argument(fn):
    """The BUNDLE_DIR argument: a bundle directory (bundle.json + model files)."""
    return click.argument("bundle_dir", type=click.Path(file_okay=False, path_type=Path))(fn)


def load(config: Path):
    """The validated PipelineConfig of a YAML file (ConfigError, one line per problem, when it is not)."""
    from pipeline.config import load_config

    return load_config(config)
