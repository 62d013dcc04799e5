"""The benchmarked stages: the tutorial's per-device settings and the fast profile.

Each stage is one ``train.py`` run under the deepspeed launcher with the tutorial's flags for
that stage (``tests/tutorial/*.sh``), except what a benchmark must change: ``--max_steps``
instead of an epoch, no checkpoints, one gradient-accumulation step (so an optimizer step is one
micro-batch, as in the clean loop), and the benchmark's own models and data. The fast profile
changes only what ``docs/throughput.md`` lists: ZeRO-2 and no gradient checkpointing, and
optionally a larger micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from bunny.bench.assets import BenchModels
from bunny.bench.synthetic import StageData

PRETRAIN_TEXT_TOKENS = 64
RECIPE_TEXT_TOKENS = 320


@dataclass(frozen=True)
class Stage:
    name: str
    kind: str  # "pretrain" or "lora": the clean loop's setting it compares with
    profile: str  # "tutorial" or "fast"
    deepspeed: str  # a shipped config name
    micro_batch: int
    gradient_checkpointing: bool
    unfreeze_vision_tower: bool = False
    extra_flags: tuple[tuple[str, object], ...] = ()

    @property
    def template(self) -> str:
        return "plain" if self.kind == "pretrain" else "phi3"

    @property
    def text_tokens(self) -> int:
        return PRETRAIN_TEXT_TOKENS if self.kind == "pretrain" else RECIPE_TEXT_TOKENS

    @property
    def model_max_length(self) -> int:
        return 2048 if self.kind == "pretrain" else 4096


def _tutorial_and_fast(name: str, kind: str, deepspeed: str, micro_batch: int, unfreeze: bool = False) -> list[Stage]:
    return [
        Stage(name, kind, "tutorial", deepspeed, micro_batch, True, unfreeze),
        Stage(f"{name}_fast", kind, "fast", "zero2", micro_batch, False, unfreeze),
    ]


_PRETRAIN = _tutorial_and_fast("pretrain", "pretrain", "zero2", 8)
_LORA = _tutorial_and_fast("lora", "lora", "zero3", 4)
_LORA_UNFROZEN = _tutorial_and_fast("lora_unfrozen", "lora", "zero3", 4, unfreeze=True)
# The tutorial LoRA stage as it ran before bunny/train/zero3.py: ZeRO-3 hooks on every module.
_LORA_MODULE_HOOKS = Stage("lora_module_hooks", "lora", "tutorial", "zero3", 4, True,
                           extra_flags=(("zero3_layer_fetch", False),))
# In order of importance: a run under a time budget drops the last ones first.
STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (_PRETRAIN[0], _LORA[0], _LORA[1], _PRETRAIN[1], _LORA_MODULE_HOOKS, _LORA_UNFROZEN[0],
                  _LORA_UNFROZEN[1])
}


def scaled(stage: Stage, micro_batch_scale: int) -> Stage:
    """A fast-profile stage with its micro-batch multiplied (the global batch is kept by
    dividing the gradient accumulation steps by the same factor)."""
    if stage.profile != "fast" or micro_batch_scale == 1:
        return stage
    return replace(stage, micro_batch=stage.micro_batch * micro_batch_scale)


def train_argv(
    stage: Stage, models: BenchModels, data: StageData, output_dir: Path, max_steps: int, workers: int
) -> list[str]:
    """The ``train.py`` flags of one stage (``--bf16``/``--tf32`` are dropped by train.py on a
    machine without CUDA)."""
    flags: dict[str, object] = {
        "deepspeed": stage.deepspeed,
        "model_name_or_path": models.llm,
        "model_type": "phi-3",
        "version": stage.template,
        "data_path": data.data_path,
        "image_folder": data.image_folder,
        "vision_tower": models.vision_tower,
        "mm_projector_type": "mlp2x_gelu",
        "image_aspect_ratio": "square" if stage.kind == "pretrain" else "pad",
        "bf16": True,
        "output_dir": output_dir,
        "max_steps": max_steps,
        "per_device_train_batch_size": stage.micro_batch,
        "gradient_accumulation_steps": 1,
        "save_strategy": "no",
        "learning_rate": 1e-3 if stage.kind == "pretrain" else 2e-4,
        "weight_decay": 0.0,
        "warmup_ratio": 0.03,
        "lr_scheduler_type": "cosine",
        "logging_steps": 1,
        "tf32": True,
        "model_max_length": stage.model_max_length,
        "gradient_checkpointing": stage.gradient_checkpointing,
        "dataloader_num_workers": workers,
        "lazy_preprocess": True,
        "report_to": "none",
        "skip_image_check": True,
    }
    if stage.kind == "pretrain":
        flags["tune_mm_mlp_adapter"] = True
    else:
        flags.update(lora_enable=True, lora_r=128, lora_alpha=256, mm_projector_lr=2e-5, group_by_modality_length=False)
        if stage.unfreeze_vision_tower:
            flags["unfreeze_vision_tower"] = True
    flags.update(stage.extra_flags)
    return [item for key, value in flags.items() for item in (f"--{key}", str(value))]
