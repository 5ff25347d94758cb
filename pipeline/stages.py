"""The pipeline's stages. Each reads and writes files in the run directory (pipeline.rundir), so
any stage can be re-run alone: adapt (pipeline.adapt_stage), distill (pipeline.distill_stage),
export and validate (here), and `run_pipeline`, all of them in order.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.adapt_stage import make_run_split
from pipeline.config import PipelineConfig
from pipeline.data import Split
from pipeline.rundir import RunDir, load_split

log = logging.getLogger("edgekiln")


# --------------------------------------------------------------------------- helpers (RunDir has them all)


def checkpoint_path(cfg: PipelineConfig, role: str) -> Path:
    return cfg.run.checkpoint(role)


def update_metrics(run_dir: Path, section: str, values: dict[str, Any]) -> dict[str, Any]:
    return RunDir(run_dir).update_metrics(section, values)


def read_metrics(run_dir: Path) -> dict[str, Any]:
    return RunDir(run_dir).read_metrics()


def _split(cfg: PipelineConfig, create: bool) -> Split:
    return make_run_split(cfg, cfg.run) if create else load_split(cfg.run)


# --------------------------------------------------------------------------- export + validate (pipeline.export_stage)

from pipeline.export_stage import (  # noqa: E402,F401  (re-exported: callers import them from here)
    default_export_role, pytorch_reference, run_export, run_pipeline, run_validate,
)
