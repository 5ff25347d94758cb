"""edgekiln's training side: config, data, models, stages, CLI."""

__version__ = "0.2.0"
