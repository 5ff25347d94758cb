"""The Pareto front of a run's candidates, measured again here: `edgekiln bench` and bench/pareto.py.

A run's candidates are the artifacts of its shipped bundle and of every bundle kept under
`candidates/` beside it (exporters.deploy). Their accuracy, agreement and drop interval come from
the parity records in each bundle.json; latency and throughput are timed now, every candidate of
every run given side by side in one process (exporters.deploy.measure), so the figures compare.
Each run is then judged with the deploy settings recorded in its bundle.json.

    groups = pareto_groups([Path("runs/demo"), Path("runs/textures")])   # [(name, Choice, recorded choice)]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from exporters.config import DeployConfig
from exporters.deploy import Candidate, Choice, bundle_candidates, choose, measure
from runtime.bundle import BUNDLE_FILE, Bundle, read_bundle
from runtime.errors import BundleError


def run_bundles(path: Path) -> list[Bundle]:
    """A run directory's (or a bundle directory's) shipped bundle and the candidate bundles beside it."""
    path = Path(path)
    shipped = path / "bundle" if (path / "bundle" / BUNDLE_FILE).is_file() else path
    if not (shipped / BUNDLE_FILE).is_file():
        raise BundleError(f"{path}: neither a bundle nor a run directory with a bundle/ in it")
    others = sorted(p for p in (shipped.parent / "candidates").glob("*") if (p / BUNDLE_FILE).is_file())
    return [read_bundle(shipped, verify=True)] + [read_bundle(p, verify=True) for p in others]


def recorded_deploy(bundle: Bundle) -> tuple[DeployConfig, dict[str, Any] | None]:
    """The deploy settings export judged this bundle with (defaults when it predates them), and its choice."""
    rec = bundle.manifest.deploy or {}
    cfg = DeployConfig(objective=rec.get("objective", "latency"), metric=rec.get("metric"), batch=rec.get("batch", 16),
                       **(rec.get("budgets") or {}))
    return cfg, rec.get("chosen")


def pareto_groups(paths: list[Path], rounds: int = 30, threads: int | None = None,
                  batch: int | None = None) -> list[tuple[str, Choice, dict[str, Any] | None]]:
    """For each run: its candidates measured (all runs side by side), judged by its recorded deploy settings."""
    groups: list[tuple[str, list[Candidate], DeployConfig, dict | None]] = []
    bundles: dict[str, Bundle] = {}
    for path in paths:
        found = run_bundles(path)
        cfg, recorded = recorded_deploy(found[0])
        cfg = cfg.model_copy(update={"latency_rounds": rounds, "threads": threads, "batch": batch or cfg.batch})
        cands = [c for b in found for c in bundle_candidates(b)]
        bundles.update({str(b.root): b for b in found})
        groups.append((Path(path).resolve().name if path.name != "bundle" else path.resolve().parent.name,
                       cands, cfg, recorded))
    everything = [c for _, cands, _, _ in groups for c in cands]
    measure(everything, bundles, groups[0][2] if groups else DeployConfig(latency_rounds=rounds))
    return [(name, choose(cands, cfg), recorded) for name, cands, cfg, recorded in groups]
