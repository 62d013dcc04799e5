"""What each stage runs: its job description (built from the config) and its command line.

The flow turns the one `PipelineConfig` (or `MergeAverageConfig`) into one job per stage;
the tasks in `flows.tasks` only execute jobs. `settings` of a job is what enters the stage's
completion key; the rest (placement, environment, timeout) only says how it runs.
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
import sys
from pathlib import Path
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from flows.config import (
    EvalSet,
    MergeAverageConfig,
    PipelineConfig,
    RetrySettings,
    RuntimeSettings,
    TrainingHyperparameters,
)
from flows.gpus import Placement
from flows.markers import StageDir, completion, folder_fingerprint, stage_key

PRETRAIN = "pretrain"
AVERAGE = "average"
EVALUATE = "evaluate"
WEIGHT_SEARCH_FILE = "weight-search.json"  # the search's curve, in the average stage's folder
PROJECTOR_FILE = "mm_projector.bin"
DEEPSPEED_LAUNCHER = (sys.executable, "-u", "-m", "deepspeed.launcher.runner")


def merge_stage_name(recipe: str) -> str:
    return f"merge-{recipe}"


def train_script() -> Path:
    """`bunny/train/train.py` of the installed (or checked-out) `bunny` package."""
    spec = importlib.util.find_spec("bunny")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("the bunny package is not importable")
    return Path(spec.origin).parent / "train" / "train.py"


STAGE_FLOW = "bunny-stage"  # the per-stage flow (flows/stage_flow.py), deployed once per work pool


class RemoteStage(BaseModel):
    """Where a stage runs when it is not in this flow run: the per-stage flow's deployment on
    `work_pool`, which rebuilds the stage from `config` on that pool's host (its GPUs, its plan)."""

    model_config = ConfigDict(extra="forbid")

    work_pool: str
    config: PipelineConfig

    @property
    def deployment(self) -> str:
        return f"{STAGE_FLOW}/{self.work_pool}"


class StageJob(BaseModel, ABC):
    """A stage, ready to run. Its inputs are the outputs of the `upstream` stages (passed to
    the task by Prefect, from their futures) and `external_inputs` (existing folders)."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    stage: str
    stage_dir: Path
    placement: Placement = Field(default_factory=Placement)
    env: dict[str, str] = Field(default_factory=dict)
    timeout_hours: float | None = None
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)
    retries: RetrySettings = Field(default_factory=RetrySettings)
    force: bool = False
    upstream: list[str] = Field(default_factory=list)
    external_inputs: dict[str, Path] = Field(default_factory=dict)
    remote: RemoteStage | None = None
    run_id: str | None = Field(
        default=None, description="the pipeline run this stage belongs to, when run by the per-stage flow"
    )

    @property
    def dir(self) -> StageDir:
        return StageDir(self.stage_dir)

    @property
    def timeout_seconds(self) -> float | None:
        return self.timeout_hours * 3600 if self.timeout_hours else None

    @abstractmethod
    def settings(self, inputs: Mapping[str, Path]) -> dict[str, Any]:
        """What shapes this stage's output (besides its inputs): enters the completion key."""

    def key(self, inputs: Mapping[str, Path]) -> str:
        return stage_key(self.stage, self.settings(inputs), inputs)

    def completion(self, inputs: Mapping[str, Path], flow_run_id: str) -> dict[str, Any] | None:
        """This stage's complete-marker if it is complete for these inputs, else None."""
        if not all(path.exists() for path in inputs.values()):
            return None
        return completion(self.dir, self.key(inputs), flow_run_id if self.force else None)


class TrainJob(StageJob):
    """A deepspeed training run; `flags` are train.py's flags except the pretrain adapter,
    which comes from the upstream stage's output."""

    flags: list[str]

    def settings(self, inputs: Mapping[str, Path]) -> dict[str, Any]:
        return {"flags": self.train_flags(inputs)}

    def train_flags(self, inputs: Mapping[str, Path]) -> list[str]:
        pretrain = inputs.get(PRETRAIN)
        adapter = ["--pretrain_mm_mlp_adapter", str(pretrain / PROJECTOR_FILE)] if pretrain else []
        return [*self.flags, *adapter]

    def command(self, inputs: Mapping[str, Path], master_port: int) -> list[str]:
        return [
            *DEEPSPEED_LAUNCHER,
            *self.placement.launcher_flags(master_port),
            str(train_script()),
            *self.train_flags(inputs),
        ]

    def environment(self) -> dict[str, str]:
        threads = {"OMP_NUM_THREADS": str(self.placement.cpu_threads)} if self.placement.cpu_threads else {}
        # on the CPU path, name DeepSpeed's accelerator rather than let each process warn that it guessed it
        cpu = {"DS_ACCELERATOR": "cpu"} if self.placement.on_cpu else {}
        return {**threads, **cpu, **self.env}


class MergeJob(StageJob):
    """`python -m bunny.merge`: LoRA folder + base LLM -> full model folder."""

    model_base: Path
    model_type: str
    vision_tower: Path | None = None

    def settings(self, inputs: Mapping[str, Path]) -> dict[str, Any]:
        tower = {"vision_tower": str(self.vision_tower)} if self.vision_tower else {}
        return {"model_base": str(self.model_base), "model_type": self.model_type, **tower}

    def command(self, inputs: Mapping[str, Path]) -> list[str]:
        (lora_output,) = inputs.values()
        return [
            sys.executable, "-m", "bunny.merge",
            "--model-path", str(lora_output),
            "--model-base", str(self.model_base),
            "--model-type", self.model_type,
            "--save-model-path", str(self.dir.output),
            *(["--vision-tower", str(self.vision_tower)] if self.vision_tower else []),
        ]

    def environment(self) -> dict[str, str]:
        return {**self.placement.env(), **self.env}


class AverageJob(StageJob):
    """`python -m bunny.average`: weighted average of the merged models, config inherited."""

    names: list[str]
    weights: list[float]
    inherit_from: str
    max_shard_size: str = "5GB"

    def settings(self, inputs: Mapping[str, Path]) -> dict[str, Any]:
        return {
            "names": self.names,
            "weights": self.weights,
            "inherit_from": self.inherit_from,
            "max_shard_size": self.max_shard_size,
        }

    def command(self, inputs: Mapping[str, Path]) -> list[str]:
        merged_outputs = [inputs[name] for name in self.names]
        inherit = inputs[self.inherit_from]
        return [
            sys.executable, "-m", "bunny.average",
            *map(str, merged_outputs),
            "--output", str(self.dir.output),
            "--weights", *map(repr, self.weights),
            "--inherit-from", str(inherit),
            "--max-shard-size", self.max_shard_size,
        ]

    def environment(self) -> dict[str, str]:
        return {"CUDA_VISIBLE_DEVICES": "", **self.env}


def eval_set_identity(eval_set: EvalSet) -> dict[str, str]:
    """An eval set as a completion key sees it: its paths and its data file's fingerprint (a
    missing file fingerprints as such; preflight reports it)."""
    path = eval_set.data_path
    return {
        "name": eval_set.name,
        "data_path": str(path),
        "data": folder_fingerprint(path) if path.is_file() else "missing",
        "image_folder": str(eval_set.image_folder),
    }


class SearchAverageJob(StageJob):
    """`python -m bunny.evaluate.search_weights`: the average's weights chosen by answer loss on
    a validation split (a grid over the first model's weight for two models, greedy soup for
    more); the chosen average is this stage's output, the curve `WEIGHT_SEARCH_FILE` beside it."""

    names: list[str]
    inherit_from: str
    validation: EvalSet
    grid: list[float] | None = None
    batch_size: int = 8
    version: str = "phi3"
    dtype: str = "auto"

    @property
    def curve_file(self) -> Path:
        return self.stage_dir / WEIGHT_SEARCH_FILE

    def settings(self, inputs: Mapping[str, Path]) -> dict[str, Any]:
        return {
            "names": self.names,
            "inherit_from": self.inherit_from,
            "validation": eval_set_identity(self.validation),
            "grid": self.grid,
            "batch_size": self.batch_size,
            "version": self.version,
            "dtype": self.dtype,
        }

    def command(self, inputs: Mapping[str, Path]) -> list[str]:
        grid = ["--grid", *map(repr, self.grid)] if self.grid is not None else []
        return [
            sys.executable, "-m", "bunny.evaluate.search_weights",
            *(str(inputs[name]) for name in self.names),
            "--data", str(self.validation.data_path),
            "--image_folder", str(self.validation.image_folder),
            "--output", str(self.dir.output),
            "--curve", str(self.curve_file),
            "--inherit-from", str(self.names.index(self.inherit_from)),
            "--batch_size", str(self.batch_size),
            "--version", self.version,
            "--dtype", self.dtype,
            *grid,
        ]

    def environment(self) -> dict[str, str]:
        return {**self.placement.env(), **self.env}


class EvaluateJob(StageJob):
    """`python -m bunny.evaluate`, once per eval set: every model of the pipeline (its
    `upstream` stages' outputs, in table order) scored on held-out data; a pretrain output is
    put on `model_base` by the loader. Results go to `output/<set name>/`."""

    sets: list[EvalSet]
    model_base: Path
    accuracy: bool = True
    batch_size: int = 8
    max_new_tokens: int = 64
    version: str = "phi3"
    dtype: str = "auto"

    def settings(self, inputs: Mapping[str, Path]) -> dict[str, Any]:
        return {
            "models": self.upstream,
            "sets": [eval_set_identity(s) for s in self.sets],
            "model_base": str(self.model_base),
            "accuracy": self.accuracy,
            "batch_size": self.batch_size,
            "max_new_tokens": self.max_new_tokens,
            "version": self.version,
            "dtype": self.dtype,
        }

    def set_output(self, eval_set: EvalSet) -> Path:
        return self.dir.output / eval_set.name

    def commands(self, inputs: Mapping[str, Path]) -> list[list[str]]:
        """One `bunny.evaluate` command per eval set, all models in each."""
        return [
            [
                sys.executable, "-m", "bunny.evaluate",
                *(str(inputs[name]) for name in self.upstream),
                "--data", str(eval_set.data_path),
                "--image_folder", str(eval_set.image_folder),
                "--output", str(self.set_output(eval_set)),
                "--model-base", str(self.model_base),
                "--batch_size", str(self.batch_size),
                "--max_new_tokens", str(self.max_new_tokens),
                "--version", self.version,
                "--dtype", self.dtype,
                *([] if self.accuracy else ["--loss_only"]),
            ]
            for eval_set in self.sets
        ]

    def environment(self) -> dict[str, str]:
        return {**self.placement.env(), **self.env}


def evaluation_placement(config: PipelineConfig, placements: Mapping[str, Placement]) -> Placement:
    """Evaluation and the weight search run after every training stage: on the first recipe's
    first GPU, or on every CPU core."""
    first = placements.get(config.recipes[0].name, Placement())
    return Placement(devices=first.devices[:1])


def search_average_job(config: PipelineConfig, fixed: AverageJob, placement: Placement) -> SearchAverageJob:
    """The `average` stage with its weights searched on `average.validation`."""
    assert config.average.validation is not None  # PipelineConfig checks it
    return SearchAverageJob(
        **fixed.model_dump(include={"stage", "stage_dir", "env", "timeout_hours", "runtime", "retries",
                                    "upstream", "names", "inherit_from"}),
        placement=placement,
        validation=config.average.validation,
        grid=config.average.grid,
        batch_size=config.evaluate.batch_size,
        version=config.evaluate.version,
        dtype=config.evaluate.dtype,
    )


def evaluate_job(config: PipelineConfig, jobs: Mapping[str, StageJob], placement: Placement) -> EvaluateJob:
    """Pretrain-only, each merged recipe and the average (when there is one), on every eval set."""
    settings = config.evaluate
    models = [PRETRAIN, *(merge_stage_name(r.name) for r in config.recipes), *([AVERAGE] if AVERAGE in jobs else [])]
    return EvaluateJob(
        stage=EVALUATE,
        stage_dir=config.output_root / EVALUATE,
        placement=placement,
        env=settings.env,
        timeout_hours=settings.timeout_hours,
        runtime=config.runtime,
        retries=config.retries,
        upstream=models,
        sets=config.eval_sets,
        model_base=config.llm,
        accuracy=settings.accuracy,
        batch_size=settings.batch_size,
        max_new_tokens=settings.max_new_tokens,
        version=settings.version,
        dtype=settings.dtype,
    )


def world_size(placement: Placement) -> int | None:
    """GPUs a stage trains on: its devices, 1 on the CPU, unknown when a hostfile or an
    explicit `include` leaves the choice to deepspeed."""
    if placement.devices:
        return len(placement.devices)
    return 1 if placement.on_cpu else None


def training_flags(
    config: PipelineConfig, stage_dir: StageDir, data_path: Path, image_folder: Path,
    hyperparameters: TrainingHyperparameters, placement: Placement,
) -> list[str]:
    """Path flags from the config, then the stage's hyperparameters."""
    return [
        "--model_name_or_path", str(config.llm),
        "--vision_tower", str(config.vision_tower),
        "--data_path", str(data_path),
        "--image_folder", str(image_folder),
        "--output_dir", str(stage_dir.output),
        *hyperparameters.to_argv(placement.world_size),
    ]


def stage_work_pool(config: PipelineConfig, stage: str) -> str | None:
    """The work pool a stage of `config` runs on (None: the pipeline's own flow run)."""
    if stage == PRETRAIN:
        return config.pretrain.launch.work_pool
    for recipe in config.recipes:
        if stage in (recipe.name, merge_stage_name(recipe.name)):
            return recipe.launch.work_pool
    return None


def validation_record_env(root: Path, data: Any) -> dict[str, str]:
    """Points train.py at preflight's validation record of the stage's data (see
    `bunny.data.validation`): the images preflight decoded are not decoded again."""
    from bunny.data.validation import VALIDATION_RECORD_ENV, validation_record_path  # lazy: a heavy import

    return {VALIDATION_RECORD_ENV: str(validation_record_path(root, data.data_path, data.image_folder))}


def pipeline_jobs(
    config: PipelineConfig, placements: Mapping[str, Placement], work_pool: str | None = None
) -> dict[str, StageJob]:
    """Every stage of the pipeline, in dependency order: pretrain, recipes, merges, average.
    Stages of other work pools than `work_pool` (None: the pipeline's own) get `remote`."""
    root = config.output_root
    jobs: dict[str, StageJob] = {}
    common = dict(runtime=config.runtime, retries=config.retries)

    def remote(stage: str) -> RemoteStage | None:
        pool = stage_work_pool(config, stage)
        return RemoteStage(work_pool=pool, config=config) if pool is not None and pool != work_pool else None

    pretrain = config.pretrain
    placement = placements.get(PRETRAIN, Placement())
    jobs[PRETRAIN] = TrainJob(
        stage=PRETRAIN,
        stage_dir=root / PRETRAIN,
        placement=placement,
        env={**validation_record_env(root, pretrain.data), **pretrain.launch.env},
        timeout_hours=pretrain.launch.timeout_hours,
        flags=training_flags(config, StageDir(root / PRETRAIN), pretrain.data.data_path,
                             pretrain.data.image_folder, pretrain.hyperparameters, placement),
        remote=remote(PRETRAIN),
        **common,
    )
    for recipe in config.recipes:
        hyperparameters = config.recipe_settings(recipe)
        placement = placements.get(recipe.name, Placement())
        jobs[recipe.name] = TrainJob(
            stage=recipe.name,
            stage_dir=root / recipe.name,
            placement=placement,
            env={**validation_record_env(root, recipe.data), **recipe.launch.env},
            timeout_hours=recipe.launch.timeout_hours,
            upstream=[PRETRAIN],
            flags=training_flags(config, StageDir(root / recipe.name), recipe.data.data_path,
                                 recipe.data.image_folder, hyperparameters, placement),
            remote=remote(recipe.name),
            **common,
        )
    post = config.postprocess
    for recipe in config.recipes:
        name = merge_stage_name(recipe.name)
        jobs[name] = MergeJob(
            stage=name,
            stage_dir=root / name,
            placement=placements.get(recipe.name, Placement()),
            remote=remote(name),
            env=post.env,
            timeout_hours=post.timeout_hours,
            upstream=[recipe.name],
            model_base=config.llm,
            model_type=config.recipe_settings(recipe).model_type,
            **common,
        )
    if len(config.recipes) > 1:
        jobs[AVERAGE] = AverageJob(
            stage=AVERAGE,
            stage_dir=root / AVERAGE,
            env=post.env,
            timeout_hours=post.timeout_hours,
            upstream=[merge_stage_name(r.name) for r in config.recipes],
            names=[merge_stage_name(r.name) for r in config.recipes],
            weights=[r.weight for r in config.recipes],
            inherit_from=merge_stage_name(config.config_source_recipe.name),
            max_shard_size=post.max_shard_size,
            **common,
        )
    evaluation = evaluation_placement(config, placements)
    if AVERAGE in jobs and config.average.weights == "search":
        jobs[AVERAGE] = search_average_job(config, jobs[AVERAGE], evaluation)
    if config.eval_sets:
        jobs[EVALUATE] = evaluate_job(config, jobs, evaluation)
    return jobs


def merge_average_jobs(config: MergeAverageConfig, placement: Placement) -> dict[str, StageJob]:
    """Merge jobs for each given LoRA folder, then the average (when there are several)."""
    root = config.output_root
    post = config.postprocess
    common = dict(runtime=config.runtime, retries=config.retries, env=post.env, timeout_hours=post.timeout_hours)
    jobs: dict[str, StageJob] = {}
    for item in config.inputs:
        name = merge_stage_name(item.name)
        jobs[name] = MergeJob(
            stage=name, stage_dir=root / name, placement=placement,
            external_inputs={item.name: item.lora_path}, model_base=config.llm, model_type=config.model_type,
            vision_tower=item.vision_tower, **common,
        )
    if len(config.inputs) > 1:
        inherit = post.inherit_config_from or config.inputs[-1].name
        jobs[AVERAGE] = AverageJob(
            stage=AVERAGE, stage_dir=root / AVERAGE,
            upstream=[merge_stage_name(i.name) for i in config.inputs],
            names=[merge_stage_name(i.name) for i in config.inputs],
            weights=[i.weight for i in config.inputs],
            inherit_from=merge_stage_name(inherit),
            max_shard_size=post.max_shard_size,
            **common,
        )
    return jobs


def with_force(jobs: Mapping[str, StageJob], force: list[str] | None) -> dict[str, StageJob]:
    """`jobs` with the named stages marked to run again; unknown names are an error."""
    unknown = sorted(set(force or []) - set(jobs))
    if unknown:
        raise ValueError(f"force: unknown stage(s) {unknown}; stages are {list(jobs)}")
    return {name: job.model_copy(update={"force": name in (force or [])}) for name, job in jobs.items()}


def planned_inputs(job: StageJob, jobs: Mapping[str, StageJob]) -> dict[str, Path]:
    """The folders `job` will read: its external inputs and its upstream stages' outputs."""
    return {**job.external_inputs, **{name: jobs[name].dir.output for name in job.upstream}}


def pending_stages(jobs: Mapping[str, StageJob], flow_run_id: str) -> list[str]:
    """Stages that must run, in order: not complete for their inputs, forced, or downstream of
    a stage that must run (its output will change)."""
    pending: list[str] = []
    for name, job in jobs.items():
        if any(up in pending for up in job.upstream) or job.completion(planned_inputs(job, jobs), flow_run_id) is None:
            pending.append(name)
    return pending
