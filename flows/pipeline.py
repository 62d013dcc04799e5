"""The Prefect flows: the whole Bunny recipe, and merge + average alone.

`bunny_pipeline`: preflight -> pretrain -> every recipe in parallel -> each recipe's merge as
soon as that recipe ends -> weighted average (config inherited from the last recipe, or
`postprocess.inherit_config_from`). Stages pass their output paths along as futures, so the
Prefect UI draws the DAG. Finished stages are skipped (see `flows.markers`); `force` names
stages to run again anyway.

No training process outlives the flow: a cancellation or crash hook, the flow process's own
SIGTERM, Ctrl-C, or any exception out of the flow body stops every running stage's process
group (`flows.launcher.stop_all`); and if the flow process is killed outright, each stage's
supervisor notices and stops its group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator, Mapping
from typing import Any

from prefect import flow, get_run_logger
from prefect.futures import PrefectFuture, wait
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from flows.artifacts import publish_pipeline_summary
from flows.config import MergeAverageConfig, PipelineConfig, StageName
from flows.cpu_ops import ensure_cpu_comm_op
from flows.gpus import GpuPlanError, Placement, plan_placements, visible_gpus
from flows.launcher import allow_launches, stop_all
from flows.markers import read_json
from flows.stages import StageJob, TrainJob, merge_average_jobs, pending_stages, pipeline_jobs, with_force
from flows.tasks import EVENT, NOT_RUN, preflight_stage, submit_stage

MAX_PARALLEL_TASKS = 64


def _stop_stages_hook(flow: Any, flow_run: Any, state: Any) -> None:
    """on_cancellation / on_crashed: stop every stage process this flow process started.

    The parameter names are part of the contract: the flow engine passes them by position,
    the worker-side hook runner (`prefect.runner._hook_runner`) by keyword.
    """
    del flow, flow_run
    stop_all(f"flow run {state.name.lower()}", wait=True)


@contextlib.contextmanager
def stages_stopped_on_exit() -> Iterator[None]:
    """Stop running stages when the flow body is left by an exception, Ctrl-C or SIGTERM.

    SIGTERM (what a Prefect worker or runner sends to cancel a run) first signals every
    stage's supervisor, then goes on to the handler that was there before (Prefect's, which
    turns it into the run's cancellation or crash).
    """
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if in_main else None

    def on_sigterm(signum: int, frame: Any) -> None:
        if previous is signal.SIG_IGN:
            return
        stop_all("the flow process received SIGTERM")
        if callable(previous):
            previous(signum, frame)
        else:
            raise SystemExit(128 + signum)

    allow_launches()
    if in_main:
        signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    except BaseException:
        stop_all("the flow run is ending early", wait=True)
        raise
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)


def _submit(jobs: Mapping[str, StageJob]) -> dict[str, PrefectFuture[Any]]:
    """Submit every stage; each waits for the futures of the outputs it reads."""
    futures: dict[str, PrefectFuture[Any]] = {}
    for name, job in jobs.items():
        upstream = {up: futures[up] for up in job.upstream}
        futures[name] = submit_stage(job, upstream)
    return futures


def _finish(jobs: Mapping[str, StageJob], futures: Mapping[str, PrefectFuture[Any]]) -> list[dict[str, Any]]:
    """Wait for every stage, publish the summary table, re-raise the first failure."""
    wait(list(futures.values()))
    run_id = str(flow_run.id)
    rows = []
    failed: list[str] = []
    for name, future in futures.items():
        state = future.state
        marker = read_json(jobs[name].dir.complete_marker) if state.is_completed() else None
        summary = (marker or {}).get("summary", {})
        if marker is not None:
            status = "ran" if marker.get("flow_run_id") == run_id else "skipped"
            attempts = marker.get("attempts")
        else:
            status = "not run" if state.name == NOT_RUN else state.name.lower()
            attempts = 0 if status == "not run" else (read_json(jobs[name].dir.started_marker) or {}).get("attempts")
            failed.append(name)
        rows.append({
            "stage": name,
            "status": status,
            "attempts": attempts,
            "seconds": summary.get("seconds"),
            "steps": summary.get("steps"),
            "final_loss": summary.get("final_loss"),
            "output": str(jobs[name].dir.output),
        })
    publish_pipeline_summary(rows)
    if failed:
        futures[failed[0]].result()  # raises the stage's own error
        raise RuntimeError(f"stages {failed} did not complete")
    return rows


STAGE_FLOW_OPTIONS: dict[str, Any] = dict(
    task_runner=ThreadPoolTaskRunner(max_workers=MAX_PARALLEL_TASKS),
    on_cancellation=[_stop_stages_hook],
    on_crashed=[_stop_stages_hook],
)


def _run_stages(config: PipelineConfig | MergeAverageConfig, jobs: Mapping[str, StageJob]) -> list[dict[str, Any]]:
    pending = pending_stages(jobs, str(flow_run.id))
    get_run_logger().info(
        "stages: %s; to run: %s", ", ".join(jobs), ", ".join(pending) or "none (all complete)", extra=EVENT
    )
    preflight_stage(config, pending, {name: jobs[name].remote for name in pending if jobs[name].remote is not None})
    if any(isinstance(jobs[name], TrainJob) for name in pending) and not visible_gpus():
        ensure_cpu_comm_op(lambda message: get_run_logger().info("%s", message, extra=EVENT))
    return _finish(jobs, _submit(jobs))


@flow(name="bunny-pipeline", **STAGE_FLOW_OPTIONS)
def bunny_pipeline(config: PipelineConfig, force: list[StageName] | None = None) -> list[dict[str, Any]]:
    """Bunny's whole training recipe: preflight, pretrain, recipes in parallel, merges, average.

    Args:
        config: the whole recipe: model and data paths, per-stage hyperparameters (the
            Bunny-v1.0-4B tutorial's by default), the recipes and their weights, GPUs, retries.
        force: stages to run again even if complete, among: pretrain, each recipe's name
            (recipe-1, recipe-2), merge-<recipe name>, average, evaluate. The stages that read their
            outputs run again too. Any other name fails the run before a stage starts.
    """
    with stages_stopped_on_exit():
        try:
            placements = plan_placements(config, visible_gpus())
        except GpuPlanError:
            placements = {}  # preflight reports the problem with all the others
        return _run_stages(config, with_force(pipeline_jobs(config, placements), force))


@flow(name="bunny-merge-average", **STAGE_FLOW_OPTIONS)
def merge_and_average(config: MergeAverageConfig, force: list[StageName] | None = None) -> list[dict[str, Any]]:
    """Merge existing LoRA recipe outputs into the base LLM, then average them.

    Args:
        config: the base LLM, the LoRA recipe outputs with their weights, merge settings.
        force: stages to run again even if complete, among: merge-<input name>, average. Any
            other name fails the run before a stage starts.
    """
    with stages_stopped_on_exit():
        gpus = visible_gpus()
        placement = (
            Placement(devices=(gpus[0],))
            if gpus
            else Placement(cpu_threads=max(1, (os.cpu_count() or 1) // len(config.inputs)))
        )
        return _run_stages(config, with_force(merge_average_jobs(config, placement), force))
