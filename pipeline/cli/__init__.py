"""edgekiln's command line: one click group (`cli`, in app.py) and one module per area, each adding
its commands to it at import time. Each command parses options, calls one library function and
turns domain errors into one-line messages (errors.handle_errors).

    app.py      the group, shared option decorators (config_argument, bundle_argument), load()
    errors.py   handle_errors / fail: one line on stderr and an exit code, never a traceback
    run.py      demo, run              adapt.py    adapt, efficiency, advise
    distill.py  distill                export.py   export, validate, bench
    predict.py  predict                serve.py    serve
    data.py     check-data             sign.py     keygen, sign

Modules import torch, the stages and the exporters inside command bodies only, so that
`edgekiln serve` and `edgekiln predict` start without torch.

    edgekiln demo                      # the whole pipeline on the built-in digits data
    edgekiln run pipeline.yaml         # the whole pipeline on your data
    edgekiln predict runs/demo/bundle img1.png img2.png
"""

from pipeline.cli import adapt, data, distill, export, predict, run, serve, sign  # noqa: F401  (each adds its commands)
from pipeline.cli.app import cli


def main() -> None:
    cli(prog_name="edgekiln")


__all__ = ["cli", "main"]
