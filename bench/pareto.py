"""The Pareto table of every candidate of one or more runs, all measured side by side in one run.

    PYTHONPATH=. python bench/pareto.py runs/demo runs/textures runs/faces [--rounds 60] [--out bench/pareto]

For each run directory (or bundle directory): the shipped bundle and the candidate bundles kept
under candidates/; accuracy, the accuracy drop with its 95% interval and n, agreement and its n
come from each artifact's parity record in bundle.json; latency p50 at batch 1 and throughput are
timed now, every candidate of every run in one process in alternating blocks
(exporters.bench.alternating_latency), so the ratios between them hold on a shared machine. Each run
is judged with the deploy budgets and objective recorded in its bundle.json; the table marks the
best now (★) and the Pareto front (◆), and says which candidate export chose. A PNG per run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run directories (runs/<name>) or bundle directories")
    ap.add_argument("--rounds", type=int, default=60, help="timed batch-1 runs per candidate")
    ap.add_argument("--batch", type=int, default=None, help="throughput batch (default: the first run's deploy.batch)")
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: its own)")
    ap.add_argument("--out", type=Path, default=None, help="write <out>.json and <out>-<run>.png")
    args = ap.parse_args()

    from exporters.deploy import plot_pareto
    from exporters.pareto import pareto_groups
    from pipeline.report import print_deploy

    groups = pareto_groups(args.runs, rounds=args.rounds, threads=args.threads, batch=args.batch)
    out = {}
    for (name, choice, recorded), path in zip(groups, args.runs):
        if name in out:  # runs that share a name (runs/run of several configs): tell them apart by their folder
            name = f"{name}-{path.resolve().parent.parent.name if path.parent.name == 'runs' else path.parent.name}"
        record = choice.to_dict()
        print_deploy(record, title=f"{name}: every candidate, measured side by side (★ best now, ◆ Pareto front)")
        if recorded:
            print(f"export chose {recorded['label']} ({recorded['artifact']}).")
        out[name] = {**record, "export_chose": recorded}
        if args.out:
            png = plot_pareto(record["candidates"], args.out.parent / f"{args.out.name}-{name}.png",
                              title=f"{name}: accuracy vs latency")
            if png:
                print(f"wrote {png}")
    if args.out:
        path = args.out.with_suffix(".json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
