"""The pipeline's one typed configuration.

Everything the flow needs is here: model and data paths, per-stage hyperparameters whose field
names are `bunny/train/train.py`'s flags (defaults: the Bunny-v1.0-4B tutorial's values), the
recipes to train and average, GPU assignment, retries and preflight settings. Prefect builds the
flow's parameter schema (the UI's run form) from these models and the deepspeed command lines
come from `TrainingHyperparameters.to_argv`, so the two can never disagree.

Settings that change what a stage produces are part of its completion key (see
`flows.markers`); launch settings (`LaunchSettings`, GPUs, retries, timeouts, environment) are
not: moving a finished stage to other GPUs does not make it stale.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

if TYPE_CHECKING:
    from bunny.tiny import TinyAssets

STAGE_NAME_PATTERN = r"^[a-z0-9][a-z0-9-]*$"  # also valid in Prefect artifact keys
SHIPPED_DEEPSPEED_CONFIGS = ("zero2", "zero3")
# a flow's `force` parameter: names of stages to run again (checked against the config's stages)
StageName = Annotated[str, Field(pattern=STAGE_NAME_PATTERN, max_length=48, examples=["recipe-2"])]
# flags the pipeline fills in from paths; hyperparameters may not set them
PATH_FLAGS = (
    "model_name_or_path",
    "vision_tower",
    "data_path",
    "image_folder",
    "output_dir",
    "pretrain_mm_mlp_adapter",
)


def format_flag_value(value: bool | int | float | str | Path) -> str:
    """Render a value the way the tutorial writes it: booleans as True/False, 1.0 as 1."""
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, float):
        text = repr(value)
        return text[:-2] if text.endswith(".0") else text
    return str(value)


# Descriptions of the fields that do not carry their own (`Field(description=...)`), by name;
# the `train.py` flags say what the tutorial's flag does. Shown in Prefect's run form.
FIELD_DESCRIPTIONS = {
    "model_type": "LLM family (--model_type): phi-3, llama, qwen2",
    "mm_projector_type": "projector between the vision tower and the LLM: linear, mlp<N>x_gelu, identity",
    "tune_mm_mlp_adapter": "train only the projector (the pretrain stage)",
    "lora_enable": "train LoRA adapters on every linear layer of the LLM",
    "lora_r": "LoRA rank",
    "lora_alpha": "LoRA alpha (scale = alpha / r)",
    "mm_projector_lr": "learning rate of the projector in a LoRA run (default: learning_rate)",
    "unfreeze_vision_tower": "also train the whole vision tower (recipe-2 of Bunny-v1.0-4B)",
    "image_aspect_ratio": "square: resize; pad: pad to a square with the image mean first",
    "group_by_modality_length": "batch image and text-only samples separately, by length",
    "bf16": "bfloat16 mixed precision (ignored with one warning on the CPU)",
    "num_train_epochs": "passes over the data",
    "per_device_train_batch_size": "samples per GPU per micro-batch",
    "per_device_eval_batch_size": "samples per GPU per evaluation batch",
    "gradient_accumulation_steps": "micro-batches per optimizer step (derived from global_batch_size when that is set)",
    "evaluation_strategy": "evaluation schedule (the tutorial: no)",
    "save_strategy": "checkpoint schedule: steps, epoch or no",
    "save_steps": "optimizer steps between checkpoints (a failed stage resumes from the newest)",
    "save_total_limit": "checkpoints kept",
    "learning_rate": "peak learning rate",
    "weight_decay": "AdamW weight decay",
    "warmup_ratio": "fraction of the steps spent warming the learning rate up",
    "lr_scheduler_type": "learning-rate schedule after warm-up",
    "logging_steps": "optimizer steps between loss log lines (the loss artifact's resolution)",
    "tf32": "TF32 matmuls on Ampere+ GPUs (ignored with one warning on the CPU)",
    "model_max_length": "tokens per sample, image tokens included; longer samples are truncated",
    "gradient_checkpointing": "recompute activations in the backward pass: less memory, ~30% slower",
    "dataloader_num_workers": "data-loading processes per GPU",
    "lazy_preprocess": "accepted for the tutorial's commands; data is always read lazily",
    "report_to": "HF Trainer integrations (none: the pipeline's own artifacts only)",
    "seed": "random seed (default: the HF Trainer's)",
    "pretrain": "projector alignment: its data, hyperparameters and launch settings",
    "recipe_hyperparameters": "hyperparameters shared by every recipe (each recipe's overrides apply on top)",
    "recipes": "the LoRA recipes, trained in parallel, merged, then averaged with their weights",
    "postprocess": "LoRA merge and weighted average settings",
    "gpus": "which GPUs the stages use and the first master port",
    "retries": "how often and how soon a failed stage is retried (it resumes from its checkpoint)",
    "preflight": "checks run before any stage starts",
    "runtime": "stopping, progress and log settings of every stage",
    "data": "the stage's records and image folder",
    "data_path": "the records: a JSON list in the Bunny / LLaVA conversation format",
    "image_folder": "folder the records' image paths are relative to",
    "hyperparameters": "train.py flags of this stage (the tutorial's values by default)",
    "launch": "how this stage's processes start (not part of its completion key)",
    "name": "stage name: lower-case letters, digits and dashes",
    "timeout_hours": "stop the stage's processes after this many hours (default: no limit)",
    "env": "extra environment variables of the stage's processes",
    "max_shard_size": "largest safetensors shard of the merged and averaged models",
    "delay_seconds": "seconds between a stage's failure and its retry",
    "progress_interval_seconds": "seconds between updates of a training stage's progress",
    "output_root": "every stage's folder is created under it",
    "inputs": "finished LoRA recipe outputs to merge, then average with their weights",
    "lora_path": "a LoRA recipe's output folder (adapter and non_lora_trainables.bin)",
    "weight": "weight of this model in the average (the weights sum to 1)",
}


def field_description(model: type[BaseModel], name: str) -> str | None:
    """The description of `model`'s field `name`: its own, else that of the same field in a
    base model (a subclass that changes a default loses it), else FIELD_DESCRIPTIONS'."""
    described = (
        base.model_fields[name].description
        for base in model.__mro__
        if isinstance(base, type) and issubclass(base, BaseModel) and name in base.model_fields
    )
    return next((text for text in described if text), None) or FIELD_DESCRIPTIONS.get(name)


def _describe_fields(schema: dict[str, Any], model: type[BaseModel]) -> None:
    """Pydantic schema hook: every property of a config model gets its description."""
    for name, prop in schema.get("properties", {}).items():
        if not prop.get("description") and (text := field_description(model, name)):
            prop["description"] = text


class Strict(BaseModel):
    """Base of every config model: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_describe_fields)


class TrainingHyperparameters(Strict):
    """`train.py` flags other than paths. A field set to None is left off the command line."""

    deepspeed: str = Field(description="DeepSpeed config: a JSON path or a shipped name (zero2, zero3)")
    model_type: str = "phi-3"
    version: str = Field(description="conversation template")
    mm_projector_type: str = "mlp2x_gelu"
    tune_mm_mlp_adapter: bool | None = None
    lora_enable: bool | None = None
    lora_r: int | None = None
    lora_alpha: int | None = None
    mm_projector_lr: float | None = None
    unfreeze_vision_tower: bool | None = None
    image_aspect_ratio: Literal["square", "pad"]
    group_by_modality_length: bool | None = None
    bf16: bool = True
    num_train_epochs: float = 1
    per_device_train_batch_size: int
    per_device_eval_batch_size: int = 4
    gradient_accumulation_steps: int = 4
    global_batch_size: int | None = Field(
        default=None,
        ge=1,
        description="samples per optimizer step across all GPUs; when set, gradient_accumulation_steps "
        "is derived from it and the stage's GPU count, so the recipe's global batch survives a change "
        "of GPUs (None: use gradient_accumulation_steps as given)",
    )
    evaluation_strategy: str = "no"
    save_strategy: str = "steps"
    save_steps: int
    save_total_limit: int = 1
    learning_rate: float
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    lr_scheduler_type: str = "cosine"
    logging_steps: int = 1
    tf32: bool = True
    model_max_length: int
    gradient_checkpointing: bool = True
    dataloader_num_workers: int = 4
    lazy_preprocess: bool = True
    report_to: str = "none"
    max_steps: int | None = Field(default=None, description="stop after this many optimizer steps")
    seed: int | None = None
    extra_flags: dict[str, str] = Field(
        default_factory=dict, description="any other HF TrainingArguments flag, name -> value"
    )

    @field_validator("extra_flags")
    @classmethod
    def _extra_flags_are_new(cls, flags: dict[str, str]) -> dict[str, str]:
        taken = set(cls.model_fields) | set(PATH_FLAGS)
        clashes = sorted(name for name in flags if name.lstrip("-") in taken)
        if clashes:
            raise ValueError(f"extra_flags {clashes} must be set through their own fields")
        return flags

    def accumulation_steps(self, world_size: int | None) -> int:
        """Gradient accumulation that keeps `global_batch_size` on `world_size` GPUs (the
        configured value when either is unknown)."""
        if self.global_batch_size is None or world_size is None:
            return self.gradient_accumulation_steps
        per_step = self.per_device_train_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} is not a multiple of per_device_train_batch_size "
                f"{self.per_device_train_batch_size} x {world_size} GPUs"
            )
        return self.global_batch_size // per_step

    def template(self) -> str:
        """The conversation template: `version`, or the LLM family's own when unset."""
        from bunny.conversation import default_template  # imports transformers: only when needed

        return self.version or default_template(self.model_type)

    def to_argv(self, world_size: int | None = None) -> list[str]:
        """`--flag value` pairs in field order, None fields omitted, extra_flags last.
        `world_size`: the stage's GPU count, for `global_batch_size`."""
        argv: list[str] = []
        for name in type(self).model_fields:
            value = getattr(self, name)
            if name == "gradient_accumulation_steps":
                value = self.accumulation_steps(world_size)
            if name == "version":
                value = self.template()
            if name in ("extra_flags", "global_batch_size") or value is None:
                continue
            argv += [f"--{name}", format_flag_value(value)]
        for name, value in self.extra_flags.items():
            argv += [f"--{name.lstrip('-')}", value]
        return argv


class PretrainHyperparameters(TrainingHyperparameters):
    """Projector alignment: the tutorial's pretrain command."""

    deepspeed: str = "zero2"
    version: str = "plain"
    tune_mm_mlp_adapter: bool | None = True
    image_aspect_ratio: Literal["square", "pad"] = "square"
    per_device_train_batch_size: int = 8
    global_batch_size: int | None = 256  # the tutorial's 8 GPUs x 8 x 4
    save_steps: int = 24000
    learning_rate: float = 1e-3
    model_max_length: int = 2048


class RecipeHyperparameters(TrainingHyperparameters):
    """LoRA visual instruction tuning: the tutorial's recipe commands."""

    lora_enable: bool | None = True
    lora_r: int | None = 128
    lora_alpha: int | None = 256
    mm_projector_lr: float | None = 2e-5
    deepspeed: str = "zero3"
    version: str | None = Field(
        default=None,
        description="conversation template (--version); default: the LLM family's own "
        "(phi3 for phi-3, llama3 for llama, qwen2 for qwen2)",
    )
    image_aspect_ratio: Literal["square", "pad"] = "pad"
    group_by_modality_length: bool | None = False
    global_batch_size: int | None = 128  # the tutorial's 8 GPUs x 4 x 4
    per_device_train_batch_size: int = 4
    save_steps: int = 500
    learning_rate: float = 2e-4
    model_max_length: int = 4096


def _recipe_overrides_model() -> type[Strict]:
    """Every recipe hyperparameter, optional: what a recipe may set differently."""
    fields: dict[str, Any] = {
        name: (field.annotation | None, Field(default=None, description=field_description(RecipeHyperparameters, name)))
        for name, field in RecipeHyperparameters.model_fields.items()
    }
    doc = "A recipe's departures from the shared recipe hyperparameters; null fields keep the shared value."
    return create_model("RecipeOverrides", __base__=Strict, __doc__=doc, **fields)


RecipeOverrides = _recipe_overrides_model()


class StageData(Strict):
    """A training stage's records and the folder their image paths are relative to."""

    data_path: Path
    image_folder: Path


class LaunchSettings(Strict):
    """How a stage's processes start; not part of its completion key."""

    hostfile: Path | None = Field(
        default=None,
        description="DeepSpeed hostfile for a multi-node run ('host slots=N' lines); the stage's "
        "global batch is kept over every GPU it lists (or that include selects)",
    )
    include: str | None = Field(
        default=None,
        description="deepspeed --include, verbatim (e.g. 'node1:0,1@node2:0,1'); "
        "replaces the automatic GPU assignment",
    )
    num_gpus: int | None = Field(
        default=None, ge=1, description="GPUs for this stage on one host; default: automatic"
    )
    timeout_hours: float | None = Field(default=None, gt=0)
    env: dict[str, str] = Field(default_factory=dict, description="extra environment variables")
    work_pool: str | None = Field(
        default=None,
        description="run this stage (and a recipe's merge) where this Prefect work pool's worker "
        "runs, through the per-stage deployment 'bunny-stage/<work_pool>'; output_root, models and "
        "data must be on storage both hosts share (default: in the pipeline's own flow run)",
    )


class PretrainStage(Strict):
    data: StageData
    hyperparameters: PretrainHyperparameters = Field(default_factory=PretrainHyperparameters)
    launch: LaunchSettings = Field(default_factory=LaunchSettings)


class RecipeStage(Strict):
    """One LoRA recipe: its data, its weight in the final average and its departures from the
    shared recipe hyperparameters (`overrides`: flag name -> value)."""

    name: str = Field(pattern=STAGE_NAME_PATTERN, max_length=40)
    data: StageData
    weight: float = Field(ge=0, le=1, description="weight of this recipe's merged model in the average")
    overrides: RecipeOverrides = Field(  # type: ignore[valid-type]
        default_factory=RecipeOverrides,
        description="this recipe's departures from recipe_hyperparameters, e.g. unfreeze_vision_tower: true",
    )
    launch: LaunchSettings = Field(default_factory=LaunchSettings)


class GpuSettings(Strict):
    """Which GPUs the stages may use; with none visible every stage runs on the CPU."""

    devices: list[int] | None = Field(
        default=None, description="GPU ids to use (default: every visible GPU)"
    )
    gpus_per_recipe: int | None = Field(
        default=None,
        ge=1,
        description="GPUs each recipe gets (default: an equal share, so recipes run side by "
        "side); recipes that do not fit at once run one after the other",
    )
    master_port: int = Field(default=29500, ge=1024, le=65000, description="first master port")


class RetrySettings(Strict):
    retries: int = Field(default=2, ge=0, description="retries of a failed stage (resumes from its checkpoint)")
    delay_seconds: float = Field(default=60.0, ge=0)


class PostprocessSettings(Strict):
    """Merge and average: run as child processes too, so an OOM cannot take the flow down."""

    inherit_config_from: str | None = Field(
        default=None,
        description="recipe whose merged model's config and tokenizer the average gets "
        "(default: the last recipe, as in the tutorial)",
    )
    max_shard_size: str = "5GB"
    timeout_hours: float | None = Field(default=None, gt=0)
    env: dict[str, str] = Field(default_factory=dict)


class PreflightSettings(Strict):
    check_images: bool = Field(default=True, description="open every referenced image")
    workers: int = Field(default=8, ge=1, description="parallel image checks")
    min_free_gb: float | None = Field(
        default=None, ge=0, description="free space required under output_root (default: estimated)"
    )


class EvalSet(Strict):
    """A held-out Bunny-format file scored by the evaluate stage (or, as `average.validation`,
    the one the averaging weights are chosen on)."""

    name: str = Field(pattern=STAGE_NAME_PATTERN, max_length=40, description="its name in the tables")
    data_path: Path
    image_folder: Path


class EvaluateSettings(Strict):
    """The evaluate stage: every model of the pipeline (pretrain-only, each merged recipe, the
    average) scored on each of `sets` by `python -m bunny.evaluate`. No sets: no stage."""

    sets: list[EvalSet] = Field(default_factory=list, description="held-out (test) sets; none: no evaluate stage")
    accuracy: bool = Field(default=True, description="greedy answers and their accuracy (off: answer loss only)")
    batch_size: int = Field(default=8, ge=1, description="records per forward pass / generate call")
    max_new_tokens: int = Field(default=64, ge=1, description="greedy answer length limit")
    version: str = Field(default="phi3", description="conversation template of the prompts")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="precision of the scored models (auto: float32 on the CPU, as saved on a GPU)"
    )
    timeout_hours: float | None = Field(default=None, gt=0)
    env: dict[str, str] = Field(default_factory=dict)


class AverageSettings(Strict):
    """How the average's weights are chosen: `fixed` (each recipe's `weight`, the tutorial's
    0.3 / 0.7) or `search` (on `validation`: a weight grid for two recipes, greedy soup for more)."""

    weights: Literal["fixed", "search"] = Field(
        default="fixed",
        description="fixed: each recipe's `weight` (the tutorial's 0.3 / 0.7); search: chosen by answer loss "
        "on `validation` (a grid for two recipes, greedy soup for more)",
    )
    validation: EvalSet | None = Field(default=None, description="the split `search` scores (never a test set)")
    grid: list[float] | None = Field(
        default=None, description="first recipe's weights to try (default: bunny.evaluate.search's 0, 0.1, ..., 1)"
    )

    @model_validator(mode="after")
    def _search_needs_validation(self) -> AverageSettings:
        if self.weights == "search" and self.validation is None:
            raise ValueError("average.weights 'search' needs average.validation (a validation split)")
        if self.grid is not None and (not self.grid or any(not 0 <= w <= 1 for w in self.grid)):
            raise ValueError(f"average.grid must be weights in [0, 1], got {self.grid}")
        return self


class RuntimeSettings(Strict):
    kill_grace_seconds: float = Field(
        default=30.0, ge=0, description="SIGTERM to SIGKILL delay when a stage is stopped"
    )
    progress_interval_seconds: float = Field(default=10.0, gt=0)
    log_interval_seconds: float = Field(default=15.0, gt=0, description="Prefect log throttle")
    cpu_threads: int | None = Field(
        default=None, ge=1, description="threads per CPU-path stage (default: cores / parallel stages)"
    )


def check_weighted_names(kind: str, names: list[str], weights: list[float], post: PostprocessSettings) -> None:
    """Names unique, weights summing to 1, the config source one of the names."""
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"{kind} names must be unique, repeated: {duplicates}")
    total = sum(weights)
    if not math.isclose(total, 1.0, abs_tol=1e-6):
        raise ValueError(f"{kind} weights {weights} sum to {total:g}, not 1")
    if post.inherit_config_from is not None and post.inherit_config_from not in names:
        raise ValueError(f"postprocess.inherit_config_from {post.inherit_config_from!r} is not a {kind}: {names}")


# The CPU demo (`PipelineConfig.demo`): steps and learning rates at which the tiny models learn
# to read the image (measured, README "The demo": 1e-2 for the recipes learnt less than 3e-3).
DEMO_PRETRAIN_STEPS = 64
DEMO_PRETRAIN_LR = 1e-2
DEMO_RECIPE_STEPS = 128
DEMO_RECIPE_LR = 3e-3
# Whether the demo builds `bunny.tiny`'s pretrained assets (text-pretrained LLM, colour-carrying
# tower features; about a minute once per folder) instead of random ones, which learn nothing
# visible in the demo's steps (README, "The demo").
DEMO_PRETRAINED_ASSETS = True


class PipelineConfig(Strict):
    """The whole Bunny recipe: pretrain -> recipes in parallel -> merge each -> average."""

    output_root: Path = Field(description="every stage's folder is created under it")
    llm: Path = Field(description="base language model folder (--model_name_or_path)")
    vision_tower: Path = Field(description="vision tower folder (--vision_tower)")
    pretrain: PretrainStage
    recipe_hyperparameters: RecipeHyperparameters = Field(default_factory=RecipeHyperparameters)
    recipes: list[RecipeStage] = Field(min_length=1)
    postprocess: PostprocessSettings = Field(default_factory=PostprocessSettings)
    gpus: GpuSettings = Field(default_factory=GpuSettings)
    retries: RetrySettings = Field(default_factory=RetrySettings)
    preflight: PreflightSettings = Field(default_factory=PreflightSettings)
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)
    evaluate: EvaluateSettings = Field(
        default_factory=EvaluateSettings,
        description="the evaluate stage: held-out sets every model is scored on (none: no such stage)",
    )
    average: AverageSettings = Field(
        default_factory=AverageSettings,
        description="the average's weights: the recipes' own (fixed) or chosen on a validation split (search)",
    )

    @model_validator(mode="after")
    def _check_recipes(self) -> PipelineConfig:
        names = [recipe.name for recipe in self.recipes]
        check_weighted_names("recipe", names, [r.weight for r in self.recipes], self.postprocess)
        reserved = {"pretrain", "average", "preflight", "evaluate"} | {f"merge-{n}" for n in names}
        clashing = sorted(set(names) & reserved)
        if clashing:
            raise ValueError(f"recipe names {clashing} clash with stage names")
        for recipe in self.recipes:
            self.recipe_settings(recipe)  # overrides must validate
        self._check_evaluation()
        return self

    def _check_evaluation(self) -> None:
        """Eval set names unique; a weight search has recipes to weigh and never sees a test set."""
        sets = self.eval_sets
        names = [s.name for s in sets]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"evaluate.sets / average.validation names must be unique, repeated: {repeated}")
        validation = self.average.validation
        if self.average.weights == "search" and validation is not None:
            if len(self.recipes) < 2:
                raise ValueError("average.weights 'search' needs at least two recipes")
            tests = {s.data_path.absolute() for s in self.evaluate.sets}
            if validation.data_path.absolute() in tests:
                raise ValueError(f"average.validation {validation.data_path} is also an evaluate set: the weight "
                                 "search must not see a test split")

    @property
    def eval_sets(self) -> list[EvalSet]:
        """What the evaluate stage scores: each test set, then the search's validation split."""
        searched = self.average.validation if self.average.weights == "search" else None
        return [*self.evaluate.sets, *([searched] if searched is not None else [])]

    def recipe_settings(self, recipe: RecipeStage) -> RecipeHyperparameters:
        """The shared recipe hyperparameters with this recipe's overrides applied (validated)."""
        try:
            return RecipeHyperparameters.model_validate(
                self.recipe_hyperparameters.model_dump() | recipe.overrides.model_dump(exclude_none=True)
            )
        except ValueError as exc:
            overrides = recipe.overrides.model_dump(exclude_none=True)
            raise ValueError(f"recipe {recipe.name!r}: bad overrides {overrides}: {exc}") from exc

    def recipe(self, name: str) -> RecipeStage:
        for recipe in self.recipes:
            if recipe.name == name:
                return recipe
        raise KeyError(f"no recipe named {name!r}")

    @property
    def config_source_recipe(self) -> RecipeStage:
        name = self.postprocess.inherit_config_from
        return self.recipe(name) if name else self.recipes[-1]

    @classmethod
    def tutorial(
        cls,
        *,
        output_root: Path | str,
        llm: Path | str,
        vision_tower: Path | str,
        pretrain_data: StageData,
        recipe_1_data: StageData,
        recipe_2_data: StageData,
    ) -> PipelineConfig:
        """Bunny-v1.0-4B as in the tutorial: recipe-2 also unfreezes the tower; 0.3 / 0.7."""
        return cls(
            output_root=Path(output_root),
            llm=Path(llm),
            vision_tower=Path(vision_tower),
            pretrain=PretrainStage(data=pretrain_data),
            recipes=[
                RecipeStage(name="recipe-1", data=recipe_1_data, weight=0.3),
                RecipeStage(
                    name="recipe-2",
                    data=recipe_2_data,
                    weight=0.7,
                    overrides={"unfreeze_vision_tower": True},
                ),
            ],
        )

    @classmethod
    def demo(cls, assets: TinyAssets, output_root: Path | str, steps: int | None = None) -> PipelineConfig:
        """The tutorial's pipeline shrunk to run on a CPU in minutes with `bunny.tiny` assets.

        Long enough to learn something visible: `DEMO_PRETRAIN_STEPS` of projector alignment,
        then `DEMO_RECIPE_STEPS` per recipe at learning rates sized for a width-64 LLM (the
        tutorial's 2e-4 / 2e-5 are for 3.8B parameters and move the tiny model by nothing).
        `steps` sets every stage's steps instead (tests that only exercise the machinery).
        A checkpoint every third of a stage gives a stopped stage something to resume from.
        DeepSpeed configs stay the tutorial's (ZeRO-2 pretrain, ZeRO-3 recipes), so the demo
        runs the same code paths as a real run.
        """

        def small(max_steps: int) -> dict[str, Any]:
            return dict(
                bf16=False,
                tf32=False,
                per_device_train_batch_size=8,
                per_device_eval_batch_size=8,
                gradient_accumulation_steps=1,
                global_batch_size=None,
                save_steps=max(1, max_steps // 3),
                max_steps=max_steps,
                model_max_length=256,
                gradient_checkpointing=False,
                dataloader_num_workers=0,
                seed=0,
            )

        config = cls.tutorial(
            output_root=output_root,
            llm=assets.llm,
            vision_tower=assets.vision_tower,
            pretrain_data=StageData(data_path=assets.pretrain_data, image_folder=assets.pretrain_images),
            recipe_1_data=StageData(data_path=assets.recipe1_data, image_folder=assets.finetune_images),
            recipe_2_data=StageData(data_path=assets.recipe2_data, image_folder=assets.finetune_images),
        )
        pretrain = PretrainHyperparameters(**small(steps or DEMO_PRETRAIN_STEPS), learning_rate=DEMO_PRETRAIN_LR)
        recipes = RecipeHyperparameters(
            **small(steps or DEMO_RECIPE_STEPS), learning_rate=DEMO_RECIPE_LR, mm_projector_lr=DEMO_RECIPE_LR,
            lora_r=8, lora_alpha=16,
        )
        return config.model_copy(
            update={
                "pretrain": config.pretrain.model_copy(update={"hyperparameters": pretrain}),
                "recipe_hyperparameters": recipes,
                "retries": RetrySettings(retries=1, delay_seconds=1),
                "preflight": PreflightSettings(workers=2),
                "runtime": RuntimeSettings(
                    kill_grace_seconds=5, progress_interval_seconds=1, log_interval_seconds=5
                ),
            }
        )


class MergeInput(Strict):
    """A finished LoRA recipe output to merge, with its weight in the average."""

    name: str = Field(pattern=STAGE_NAME_PATTERN, max_length=40)
    lora_path: Path
    weight: float = Field(ge=0, le=1)
    vision_tower: Path | None = Field(
        default=None,
        description="the vision tower's folder, when the run's recorded mm_vision_tower is not a local "
        "folder (the original Bunny's runs may name a hub id or a relative path): passed as --vision-tower",
    )


class MergeAverageConfig(Strict):
    """Merge + average only, from existing recipe outputs (the second deployment)."""

    output_root: Path
    llm: Path = Field(description="the base LLM the LoRA recipes were trained on")
    model_type: str = "phi-3"
    inputs: list[MergeInput] = Field(min_length=1)
    postprocess: PostprocessSettings = Field(default_factory=PostprocessSettings)
    retries: RetrySettings = Field(default_factory=RetrySettings)
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)

    @model_validator(mode="after")
    def _check_inputs(self) -> MergeAverageConfig:
        check_weighted_names("input", [i.name for i in self.inputs], [i.weight for i in self.inputs], self.postprocess)
        return self
