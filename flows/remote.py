"""Run a stage on another host: as a flow run of the per-stage deployment on its work pool.

A stage whose `launch.work_pool` is set is not executed in the pipeline's flow run. Its task
(`remote_stage`) starts `bunny-stage/<work_pool>` (`flows.stage_flow.bunny_stage`) as a
subflow run, which that pool's worker runs on its own host: it plans the stage's GPUs there,
runs the same stage task (markers, logs, artifacts as for a local stage) and writes to the
shared `output_root`. The task waits for that flow run and fails with its state's message;
when the pipeline run is cancelled or crashes, it cancels the remote flow run, whose worker
then stops the stage's processes.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

from prefect import get_client, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from prefect.states import Cancelling, State

from flows.launcher import stopping
from flows.stages import RemoteStage, StageJob

POLL_SECONDS = 2.0
CANCEL_WAIT_SECONDS = 120.0


class RemoteStageError(RuntimeError):
    """The remote flow run of a stage did not complete."""


def _missing_deployment(stage: str, target: RemoteStage) -> str:
    return (f"{stage}: no deployment {target.deployment!r}: deploy the per-stage flow to work pool "
            f"{target.work_pool!r} (deployments/README.md, 'Stages on other hosts')")


def remote_deployment_problems(remotes: Mapping[str, RemoteStage]) -> list[str]:
    """Stages (of `stage -> where it runs`) whose per-stage deployment the server lacks, so that
    preflight names them before the first stage starts rather than when their turn comes."""
    problems = []
    with get_client(sync_client=True) as client:
        for stage, target in remotes.items():
            try:
                client.read_deployment_by_name(target.deployment)
            except ObjectNotFound:
                problems.append(_missing_deployment(stage, target))
    return problems


@task(name="remote-stage", task_run_name="{job.stage}", cache_policy=NO_CACHE)
def remote_stage(job: StageJob, upstream: Mapping[str, PrefectFuture[Path]]) -> Path | State:
    """Run `job` through the per-stage deployment of its work pool and wait for it.
    `upstream` only orders it after the stages whose outputs it reads (shared storage)."""
    from flows.tasks import EVENT, wait_for_upstream  # flows.tasks dispatches to this task

    assert job.remote is not None
    logger = get_run_logger()
    waited = wait_for_upstream(job, upstream)
    if isinstance(waited, State):
        logger.info("%s", waited.message, extra=EVENT)
        return waited
    target = job.remote
    try:
        child = run_deployment(
            target.deployment,
            parameters={
                "config": target.config.model_dump(mode="json"),
                "stage": job.stage,
                "force": job.force,
                "pipeline_run_id": str(flow_run.id),
            },
            flow_run_name=job.stage,
            timeout=0,
        )
    except ObjectNotFound as exc:
        raise RemoteStageError(_missing_deployment(job.stage, target)) from exc
    logger.info("%s: runs on work pool %s as flow run %s", job.stage, target.work_pool, child.name)
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(child.id).state
        while state is None or not state.is_final():
            if stopping():
                client.set_flow_run_state(child.id, Cancelling(message="its pipeline run is ending"), force=True)
                deadline = time.monotonic() + CANCEL_WAIT_SECONDS
                while (state is None or not state.is_final()) and time.monotonic() < deadline:
                    time.sleep(POLL_SECONDS)
                    state = client.read_flow_run(child.id).state
                raise RemoteStageError(f"{job.stage}: cancelled its flow run {child.name} on work pool {target.work_pool}")
            time.sleep(POLL_SECONDS)
            state = client.read_flow_run(child.id).state
    if not state.is_completed():
        raise RemoteStageError(
            f"{job.stage}: flow run {child.name} on work pool {target.work_pool} ended {state.name}: {state.message}"
        )
    return job.dir.output
