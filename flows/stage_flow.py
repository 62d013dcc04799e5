"""`bunny-stage`: one stage of a pipeline run, on the host of the work pool it names.

Deployed once per work pool as `bunny-stage/<work_pool>` (deployments/prefect.yaml); started
by the pipeline's `remote_stage` task, never by hand. It rebuilds the stage from the pipeline's
config for this host (the stages of this pool share its GPUs, the global batch is kept on
them), then runs the same task a local stage runs, with the pipeline run's id for its marker.
"""

from __future__ import annotations

from prefect import flow

from flows.config import PipelineConfig
from flows.gpus import plan_placements, visible_gpus
from flows.pipeline import STAGE_FLOW_OPTIONS, stages_stopped_on_exit
from flows.stages import STAGE_FLOW, stage_work_pool, pipeline_jobs
from flows.tasks import stage_task


@flow(name=STAGE_FLOW, flow_run_name="{stage}", **STAGE_FLOW_OPTIONS)
def bunny_stage(config: PipelineConfig, stage: str, force: bool = False, pipeline_run_id: str | None = None) -> str:
    """Run `stage` of the pipeline `config` here (its work pool's host); returns its output.

    `force`: run it even if complete; `pipeline_run_id`: the pipeline run it belongs to."""
    with stages_stopped_on_exit():
        pool = stage_work_pool(config, stage)
        jobs = pipeline_jobs(config, plan_placements(config, visible_gpus(), work_pool=pool), work_pool=pool)
        if stage not in jobs or jobs[stage].remote is not None or pool is None:
            raise ValueError(f"stage {stage!r} does not run on a work pool of its own (launch.work_pool)")
        job = jobs[stage].model_copy(update={"force": force, "run_id": pipeline_run_id})
        upstream = {name: jobs[name].dir.output for name in job.upstream}
        return str(stage_task(job)(job, upstream))
