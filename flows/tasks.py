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
from prefect.client.schemas.objects import State, TaskRunResult
from prefect.context import FlowRunContext
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from prefect.states import Cancelled
from prefect.utilities.annotations import quote

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
from flows.gpus import visible_gpus
from flows.launcher import LoggerLike, run_supervised, stopping
from flows.markers import begin_attempt, mark_complete, read_json
from flows.ports import HOST_PORTS, run_on_free_port
from flows.preflight import PreflightError, run_merge_preflight, run_preflight
from flows.evaluation import publish_evaluation, publish_weight_search, write_results
from flows.remote import remote_deployment_problems, remote_stage
from flows.slots import hold_gpu_slots
from flows.stages import AverageJob, EvaluateJob, MergeJob, RemoteStage, SearchAverageJob, StageJob, TrainJob

EVENT = {"bunny_event": True}  # marks the one-line stage reports (the demo prints only these)
PREFLIGHT_PROGRESS_EVERY = 30.0  # seconds between preflight progress log lines
PREFLIGHT_ARTIFACT_FROM = 10_000  # checks (records + images) from which a progress artifact is shown
NOT_RUN = "NotRun"  # final state name of a stage whose upstream stage did not complete
PROGRESS_LINE_SECONDS = 15.0  # at most one console line per running training stage this often


def _flow_run_id() -> str:
    return str(flow_run.id or "local")


UpstreamFutures = Mapping[str, PrefectFuture[Path]]


def wait_for_upstream(job: StageJob, upstream: UpstreamFutures) -> dict[str, Path] | State:
    """Wait for the upstream stages; their outputs, or the `NotRun` state if one did not complete.

    The stage waits for them itself (they are passed `quote`d) so that it always ends in a
    final state: Prefect's own dependency resolution leaves a task whose upstream failed in
    `Pending(NotReady)` forever, and names it after its stage only once it starts.
    """
    outputs: dict[str, Path] = {}
    for name, future in upstream.items():
        if isinstance(future, Path):  # already resolved (a stage run by the per-stage flow)
            outputs[name] = future
            continue
        future.wait()
        if not future.state.is_completed():
            return Cancelled(name=NOT_RUN, message=f"{job.stage}: not run: {name} did not complete")
        outputs[name] = future.result()
    return outputs


def _run_stage(
    job: StageJob,
    upstream: UpstreamFutures,
    resumable: bool,
    body: Callable[[dict[str, Path], LoggerLike], float],
) -> Path | State:
    """Skip if complete; else prepare the folder, run `body` (returns seconds), mark complete."""
    logger = get_run_logger()
    upstream_outputs = wait_for_upstream(job, upstream)
    if isinstance(upstream_outputs, State):
        logger.info("%s", upstream_outputs.message, extra=EVENT)
        return upstream_outputs
    inputs = {**job.external_inputs, **upstream_outputs}
    run_id = job.run_id or _flow_run_id()
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


class ProgressLines:
    """Keeps a training stage's progress artifact current and, every `every` seconds, says
    where it is on the console: `recipe-1: step 5 / 12, 40 s` (or `starting, 40 s` until the
    trainer's first step)."""

    def __init__(self, stage: str, progress: TrainingProgress, logger: LoggerLike,
                 every: float = PROGRESS_LINE_SECONDS) -> None:
        self.stage, self.progress, self.logger, self.every = stage, progress, logger, every
        self.started = self.last_line = time.monotonic()

    def __call__(self) -> None:
        self.progress.update()
        now = time.monotonic()
        if now - self.last_line < self.every:
            return
        self.last_line = now
        where = "step {} / {}".format(*self.progress.last) if self.progress.last else "starting"
        self.logger.info("%s: %s, %.0f s", self.stage, where, now - self.started, extra=EVENT)


def _waiting(job: StageJob, logger: LoggerLike) -> Callable[[], None]:
    slots = ", ".join(job.placement.gpu_slots())
    return lambda: logger.info("%s: waiting for GPU slots %s (another stage or flow run holds them)",
                               job.stage, slots, extra=EVENT)


def _port_collision(job: StageJob, logger: LoggerLike) -> Callable[[int], None]:
    return lambda port: logger.warning("%s: master port %d was taken before the launch could bind it; "
                                       "relaunching on another port (no retry spent)", job.stage, port)


@task(name="train", task_run_name="{job.stage}", cache_policy=NO_CACHE)
def train_stage(job: TrainJob, upstream: UpstreamFutures) -> Path | State:
    """One deepspeed training run; resumes from its newest checkpoint after a failure."""

    def body(inputs: dict[str, Path], logger: LoggerLike) -> float:
        with hold_gpu_slots(job.placement.gpu_slots(), _waiting(job, logger)):
            progress = TrainingProgress(job.stage, job.dir.output)
            log = job.dir.next_log()  # a relaunch on another port appends to the same attempt's log
            lines = ProgressLines(job.stage, progress, logger)
            seconds = run_on_free_port(
                HOST_PORTS, job.placement.preferred_port,
                lambda port: _launch(job, job.command(inputs, port), job.environment(), logger, lines, log),
                _port_collision(job, logger),
            )
        complete = read_json(job.dir.output / TRAINING_COMPLETE_FILE)
        if complete is None:
            raise RuntimeError(f"{job.stage}: train.py exited cleanly without writing {TRAINING_COMPLETE_FILE}")
        progress.finish(complete.get("global_step"))
        publish_loss_curve(job.stage, job.dir.output)
        return seconds

    return _run_stage(job, upstream, resumable=True, body=body)


@task(name="merge", task_run_name="{job.stage}", cache_policy=NO_CACHE)
def merge_stage(job: MergeJob, upstream: UpstreamFutures) -> Path | State:
    """LoRA + base LLM -> full model folder, on the recipe's own GPUs."""

    def body(inputs: dict[str, Path], logger: LoggerLike) -> float:
        with hold_gpu_slots(job.placement.gpu_slots(), _waiting(job, logger)):
            return _launch(job, job.command(inputs), job.environment(), logger)

    return _run_stage(job, upstream, resumable=False, body=body)


@task(name="average", task_run_name="{job.stage}", cache_policy=NO_CACHE)
def average_stage(job: AverageJob, upstream: UpstreamFutures) -> Path | State:
    """Weighted average of the merged models; config and tokenizer from `inherit_from`."""

    def body(inputs: dict[str, Path], logger: LoggerLike) -> float:
        return _launch(job, job.command(inputs), job.environment(), logger)

    return _run_stage(job, upstream, resumable=False, body=body)


@task(name="average", task_run_name="{job.stage}", cache_policy=NO_CACHE)
def search_average_stage(job: SearchAverageJob, upstream: dict[str, Path]) -> Path:
    """The average with its weights chosen on the validation split; publishes the curve."""

    def body(inputs: dict[str, Path], logger: LoggerLike) -> float:
        with hold_gpu_slots(job.placement.gpu_slots(), _waiting(job, logger)):
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
        with hold_gpu_slots(job.placement.gpu_slots(), _waiting(job, logger)):
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


@task(name="preflight", task_run_name="preflight", cache_policy=NO_CACHE)
def preflight_stage(
    config: PipelineConfig | MergeAverageConfig, stages: list[str], remotes: Mapping[str, RemoteStage] | None = None
) -> list[str]:
    """Check what `stages` need before any of them starts; all problems in one error.
    `remotes`: the stages that run on other work pools, whose deployments must exist."""
    logger = get_run_logger()
    if isinstance(config, MergeAverageConfig):
        report = run_merge_preflight(config, stages)
    else:
        report = run_preflight(config, stages, visible_gpus(), PreflightProgress(logger))
    if remotes:
        pools = ", ".join(sorted({target.deployment for target in remotes.values()}))
        report.check(f"per-stage deployments exist ({pools})", remote_deployment_problems(remotes))
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
    """The task for `job`, named after its stage (so is its task run from its creation on),
    with its retry settings (a stage on another work pool: the task that runs it there, whose
    flow run retries it)."""
    if job.remote is not None:
        return remote_stage.with_options(
            name=job.stage, task_run_name=job.stage, retry_condition_fn=_retry_unless_stopping
        )
    return STAGE_TASKS[type(job)].with_options(
        name=job.stage,
        task_run_name=job.stage,
        retries=job.retries.retries,
        retry_delay_seconds=job.retries.delay_seconds,
        retry_condition_fn=_retry_unless_stopping,
    )


def submit_stage(job: StageJob, upstream: UpstreamFutures) -> PrefectFuture[Path]:
    """Submit `job`'s task; it waits for `upstream` itself (see `wait_for_upstream`), and the
    run graph still draws an edge from each upstream stage."""
    runner = FlowRunContext.get().task_runner
    edges = {"upstream": {TaskRunResult(id=future.task_run_id) for future in upstream.values()}}
    return runner.submit(stage_task(job), {"job": job, "upstream": quote(dict(upstream))}, dependencies=edges)

