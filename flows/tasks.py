"""The pipeline's Prefect tasks: preflight, and the three kinds of stage (train, merge, average).

Each stage task receives its job and its upstream stages' output paths, skips itself when
its completion marker matches (see `flows.markers`), otherwise runs its command under
`flows.launcher.run_supervised`, writes its marker last and returns its output path.
Prefect's own result caching is off: completion is the marker's business alone.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from bunny.train.train import find_resume_checkpoint
from flows.artifacts import (
    TRAINING_COMPLETE_FILE,
    TrainingProgress,
    artifact_key,
    output_summary,
    publish_loss_curve,
    publish_output,
    publish_preflight,
)
from flows.config import MergeAverageConfig, PipelineConfig
from flows.gpus import DEVICE_LOCKS, PORTS, visible_gpus
from flows.launcher import LoggerLike, run_supervised, stopping
from flows.markers import begin_attempt, mark_complete, read_json
from flows.preflight import PreflightError, run_merge_preflight, run_preflight
from flows.evaluation import publish_evaluation, publish_weight_search, write_results
from flows.stages import AverageJob, EvaluateJob, MergeJob, SearchAverageJob, StageJob, TrainJob

EVENT = {"bunny_event": True}  # marks the one-line stage reports (the demo prints only these)
PREFLIGHT_PROGRESS_EVERY = 30.0  # seconds between preflight progress log lines
PREFLIGHT_ARTIFACT_FROM = 10_000  # checks (records + images) from which a progress artifact is shown


def _flow_run_id() -> str:
    return str(flow_run.id or "local")


def _run_stage(
    job: StageJob,
    upstream: Mapping[str, Path],
    resumable: bool,
    body: Callable[[dict[str, Path], LoggerLike], float],
) -> Path:
    """Skip if complete; else prepare the folder, run `body` (returns seconds), mark complete."""
    logger = get_run_logger()
    inputs = {**job.external_inputs, **upstream}
    run_id = _flow_run_id()
    done = job.completion(inputs, run_id)
    if done is not None:
        publish_output(job.stage, done["summary"], skipped=True)
        logger.info("%s: complete from an earlier run, skipped", job.stage, extra=EVENT)
        return job.dir.output
    key = job.key(inputs)
    kept = begin_attempt(job.dir, key, run_id, job.force)
    if not resumable:
        # merge and average write their folder atomically and refuse an existing one
        shutil.rmtree(job.dir.output, ignore_errors=True)
    elif kept and (checkpoint := find_resume_checkpoint(job.dir.output)):
        logger.info("%s: resuming from %s", job.stage, checkpoint.name, extra=EVENT)
    seconds = body(inputs, logger)
    summary = output_summary(job.dir.output, seconds)
    mark_complete(job.dir, key, run_id, summary)
    publish_output(job.stage, summary, skipped=False)
    loss = f", loss {summary['final_loss']:.4f}" if summary["final_loss"] is not None else ""
    logger.info("%s: done in %.0f s%s -> %s", job.stage, seconds, loss, job.dir.output, extra=EVENT)
    return job.dir.output


def _launch(job: StageJob, command: list[str], env: dict[str, str], logger: LoggerLike,
            on_tick: Callable[[], None] | None = None, log: Path | None = None) -> float:
    """`log`: an attempt's log to append to (several commands in one attempt); default: a new one."""
    return run_supervised(
        job.stage,
        command,
        log or job.dir.next_log(),
        env=env,
        timeout=job.timeout_seconds,
        grace=job.runtime.kill_grace_seconds,
        on_tick=on_tick,
        tick_seconds=job.runtime.progress_interval_seconds,
        log_interval=job.runtime.log_interval_seconds,
        logger=logger,
    ).seconds


def _waiting(job: StageJob, logger: LoggerLike) -> Callable[[], None]:
    devices = ",".join(map(str, job.placement.devices))
    return lambda: logger.info("%s: waiting for GPUs %s (another stage is using them)", job.stage, devices)


@task(name="train", task_run_name="{job.stage}", cache_policy=NO_CACHE)
def train_stage(job: TrainJob, upstream: dict[str, Path]) -> Path:
    """One deepspeed training run; resumes from its newest checkpoint after a failure."""

    def body(inputs: dict[str, Path], logger: LoggerLike) -> float:
        with DEVICE_LOCKS.hold(job.placement.devices, _waiting(job, logger)):
            progress = TrainingProgress(job.stage, job.dir.output)
            with PORTS.reserve(job.placement.preferred_port) as port:
                seconds = _launch(job, job.command(inputs, port), job.environment(), logger, progress.update)
        complete = read_json(job.dir.output / TRAINING_COMPLETE_FILE)
        if complete is None:
            raise RuntimeError(f"{job.stage}: train.py exited cleanly without writing {TRAINING_COMPLETE_FILE}")
        progress.finish(complete.get("global_step"))
        publish_loss_curve(job.stage, job.dir.output)
        return seconds

    return _run_stage(job, upstream, resumable=True, body=body)


@task(name="merge", task_run_name="{job.stage}", cache_policy=NO_CACHE)
def merge_stage(job: MergeJob, upstream: dict[str, Path]) -> Path:
    """LoRA + base LLM -> full model folder, on the recipe's own GPUs."""

    def body(inputs: dict[str, Path], logger: LoggerLike) -> float:
        with DEVICE_LOCKS.hold(job.placement.devices, _waiting(job, logger)):
            return _launch(job, job.command(inputs), job.environment(), logger)

    return _run_stage(job, upstream, resumable=False, body=body)


@task(name="average", task_run_name="{job.stage}", cache_policy=NO_CACHE)
def average_stage(job: AverageJob, upstream: dict[str, Path]) -> Path:
    """Weighted average of the merged models; config and tokenizer from `inherit_from`."""

    def body(inputs: dict[str, Path], logger: LoggerLike) -> float:
        return _launch(job, job.command(inputs), job.environment(), logger)

    return _run_stage(job, upstream, resumable=False, body=body)


@task(name="average", task_run_name="{job.stage}", cache_policy=NO_CACHE)
def search_average_stage(job: SearchAverageJob, upstream: dict[str, Path]) -> Path:
    """The average with its weights chosen on the validation split; publishes the curve."""

    def body(inputs: dict[str, Path], logger: LoggerLike) -> float:
        with DEVICE_LOCKS.hold(job.placement.devices, _waiting(job, logger)):
            seconds = _launch(job, job.command(inputs), job.environment(), logger)
        result = publish_weight_search(job)
        chosen = " / ".join(f"{w:.3g}" for w in result["weights"])
        logger.info("%s: weights %s chosen on %s (validation answer loss %.4f)",
                    job.stage, chosen, job.validation.name, result["loss"], extra=EVENT)
        return seconds

    return _run_stage(job, upstream, resumable=False, body=body)


@task(name="evaluate", task_run_name="{job.stage}", cache_policy=NO_CACHE)
def evaluate_stage(job: EvaluateJob, upstream: dict[str, Path]) -> Path:
    """Every model on every eval set (one `bunny.evaluate` per set, one log per attempt);
    publishes the comparison table and its charts."""

    def body(inputs: dict[str, Path], logger: LoggerLike) -> float:
        log = job.dir.next_log()
        seconds = 0.0
        with DEVICE_LOCKS.hold(job.placement.devices, _waiting(job, logger)):
            for command in job.commands(inputs):
                seconds += _launch(job, command, job.environment(), logger, log=log)
        publish_evaluation(job, write_results(job))
        return seconds

    return _run_stage(job, upstream, resumable=False, body=body)


class PreflightProgress:
    """Log lines, and a progress artifact for large data sets, while images are checked."""

    def __init__(self, logger: LoggerLike) -> None:
        self.logger = logger
        self.last_log = 0.0
        self.artifacts: dict[str, UUID] = {}

    def __call__(self, what: str, done: int, total: int) -> None:
        now = time.monotonic()
        if done != total and now - self.last_log < PREFLIGHT_PROGRESS_EVERY:
            return
        self.last_log = now
        self.logger.info("preflight: %s: %d / %d checks", what, done, total)
        if total >= PREFLIGHT_ARTIFACT_FROM:
            percent = 100.0 * done / total
            if what not in self.artifacts:
                key = artifact_key(f"preflight-data-{len(self.artifacts) + 1}", "progress")
                self.artifacts[what] = create_progress_artifact(percent, key=key, description=f"checking {what}")
            else:
                update_progress_artifact(self.artifacts[what], percent)


@task(name="preflight", cache_policy=NO_CACHE)
def preflight_stage(config: PipelineConfig | MergeAverageConfig, stages: list[str]) -> list[str]:
    """Check what `stages` need before any of them starts; all problems in one error."""
    logger = get_run_logger()
    if isinstance(config, MergeAverageConfig):
        report = run_merge_preflight(config, stages)
    else:
        report = run_preflight(config, stages, visible_gpus(), PreflightProgress(logger))
    publish_preflight(report.markdown(stages))
    if report.problems:
        raise PreflightError(report.problems)
    if stages:
        logger.info("preflight: %d checks passed; to run: %s", len(report.passed), ", ".join(stages), extra=EVENT)
    return stages


STAGE_TASKS: dict[type[StageJob], Any] = {TrainJob: train_stage, MergeJob: merge_stage, AverageJob: average_stage}
STAGE_TASKS.update({SearchAverageJob: search_average_stage, EvaluateJob: evaluate_stage})


def _retry_unless_stopping(_task: Any, _task_run: Any, _state: Any) -> bool:
    """A stage stopped because the flow run is ending must not start again."""
    return not stopping()


def stage_task(job: StageJob) -> Any:
    """The task for `job`, with its retry settings."""
    return STAGE_TASKS[type(job)].with_options(
        retries=job.retries.retries,
        retry_delay_seconds=job.retries.delay_seconds,
        retry_condition_fn=_retry_unless_stopping,
    )

