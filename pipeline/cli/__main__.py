"""`python -m pipeline.cli ...` (e.g. under torchrun) is the `edgekiln` command."""

from pipeline.cli import main

main()
