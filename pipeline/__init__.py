"""edgekiln's training side: config, data, models, stages, CLI."""

__version__ = "0.1.0"
