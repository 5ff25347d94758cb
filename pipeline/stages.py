"""The pipeline's stages, each in a module of its own; each reads and writes files in the run
directory (pipeline.rundir.RunDir), so any stage can be re-run alone:

    adapt      pipeline.adapt_stage.run_adapt        -> AdaptResult
    distill    pipeline.distill_stage.run_distill    -> DistillResult
    export     pipeline.export_stage.run_export
    validate   pipeline.export_stage.run_validate    -> exporters.parity.GateResult
    all four   pipeline.export_stage.run_pipeline
"""

from pipeline.adapt_stage import run_adapt
from pipeline.distill_stage import run_distill
from pipeline.export_stage import default_export_role, pytorch_reference, run_export, run_pipeline, run_validate

__all__ = ["default_export_role", "pytorch_reference", "run_adapt", "run_distill", "run_export", "run_pipeline",
           "run_validate"]
