"""Command-line arguments of ``train.py``: the tutorial's flags, parsed into three dataclasses.

Flags the tutorial uses but transformers 5 dropped are translated before parsing:
``--evaluation_strategy`` -> ``--eval_strategy``; ``--warmup_ratio r`` -> ``--warmup_steps r``
(a value below 1 is a fraction of the total steps). On a machine without CUDA, ``--tf32`` and
the mixed-precision flags ``--bf16``/``--fp16`` are dropped with one warning each (the
tutorial's commands then run in float32 on the CPU). Without ``--version`` the template is
``plain`` for pretrain and the ``--model_type``'s own for the other stages. Inconsistent flag
sets are refused before anything is loaded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import HfArgumentParser

from bunny.conversation import default_template, get_template
from bunny.model.builder import ATTN_IMPLEMENTATIONS
from bunny.model.families import get_family
from bunny.model.projector import is_known_projector, PROJECTOR_TYPES
from bunny.train.ds_config import resolve_deepspeed_config

logger = logging.getLogger(__name__)

_RENAMED_FLAGS = {"--evaluation_strategy": "--eval_strategy", "--warmup_ratio": "--warmup_steps"}
if hasattr(transformers.TrainingArguments, "activation_checkpointing"):  # transformers >= 5.x deprecates the old name
    _RENAMED_FLAGS["--gradient_checkpointing"] = "--activation_checkpointing"
_CUDA_ONLY_FLAGS = ("--tf32", "--bf16", "--fp16")
_LORA_ONLY_FLAGS = ("--lora_r", "--lora_alpha", "--lora_dropout", "--lora_bias", "--mm_projector_lr")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "local folder of the base LLM"})
    model_type: str = field(default="phi-3", metadata={"help": "LLM family: phi-3, llama, qwen2"})
    version: str | None = field(
        default=None,
        metadata={"help": "conversation template: plain, phi3, llama3, llama2, qwen2 (the original's bunny, llama "
                  "also); default: plain for pretrain, else the --model_type's (phi-3: phi3, llama: llama3, qwen2: qwen2)"},
    )
    vision_tower: str = field(default=None, metadata={"help": "local folder of the SigLIP/CLIP vision tower"})
    mm_projector_type: str = field(default="mlp2x_gelu")
    mm_vision_select_layer: int = field(default=-2)
    pretrain_mm_mlp_adapter: str | None = field(default=None, metadata={"help": "mm_projector.bin of the pretrain stage"})
    tune_mm_mlp_adapter: bool = field(default=False, metadata={"help": "pretrain: train only the projector"})
    unfreeze_vision_tower: bool = field(default=False, metadata={"help": "also train the vision tower"})
    attn_implementation: str = field(
        default="auto",
        metadata={"help": "auto (flash_attention_2 when flash-attn is installed and training runs in bf16/fp16, "
                  "else sdpa), sdpa, flash_attention_2 or eager"},
    )


@dataclass
class DataArguments:
    data_path: str = field(default=None, metadata={"help": "Bunny/LLaVA-format JSON file"})
    image_folder: str | None = field(default=None)
    image_aspect_ratio: str = field(default="square", metadata={"help": "square or pad"})
    lazy_preprocess: bool = field(default=True, metadata={"help": "accepted for compatibility: data is always lazy"})
    max_mismatch_fraction: float = field(
        default=0.001,
        metadata={
            "help": "samples whose label masking cannot be computed are never trained; the run fails once "
            "they exceed this fraction of the dataset"
        },
    )
    validation_workers: int = field(default=8, metadata={"help": "threads that open images in the validation pass"})
    skip_image_check: bool = field(default=False, metadata={"help": "validate records but do not open every image"})


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    model_max_length: int = field(default=2048, metadata={"help": "sequences are cut to this many tokens"})
    lora_enable: bool = False
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_bias: str = "none"
    mm_projector_lr: float | None = None
    group_by_modality_length: bool = False
    zero3_layer_fetch: bool = field(
        default=True,
        metadata={"help": "under ZeRO-3, fetch parameters per transformer layer rather than per module "
                  "(bunny/train/zero3.py); False restores DeepSpeed's per-module hooks"},
    )
    remove_unused_columns: bool = False  # the collator's keys are the model's inputs


def translate_legacy_flags(argv: list[str]) -> list[str]:
    """Map flags that transformers 5 removed onto their replacements; drop ``--local_rank``
    (the launcher also exports LOCAL_RANK) and the CUDA-only flags where there is no CUDA."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        takes_next = not eq and i + 1 < len(argv) and not argv[i + 1].startswith("--")
        if name == "--local_rank":
            i += 1 if eq or not takes_next else 2
            continue
        if name in _CUDA_ONLY_FLAGS and not torch.cuda.is_available():
            logger.warning("%s ignored: no CUDA device on this machine", name)
            i += 1 if eq or not takes_next else 2
            continue
        out.append(_RENAMED_FLAGS.get(name, name) + (eq + value if eq else ""))
        i += 1
    return out


def check_flag_set(argv: list[str], model_args: ModelArguments, data_args: DataArguments, train_args: TrainingArguments) -> None:
    """Refuse combinations that cannot mean what the user intended, before any loading."""
    given = {arg.partition("=")[0] for arg in argv if arg.startswith("--")}
    if not train_args.lora_enable:
        stray = [flag for flag in _LORA_ONLY_FLAGS if flag in given]
        if stray:
            raise ValueError(f"{', '.join(stray)} given without --lora_enable True")
    if model_args.tune_mm_mlp_adapter and train_args.lora_enable:
        raise ValueError("--tune_mm_mlp_adapter (pretrain: projector only) and --lora_enable exclude each other")
    if model_args.tune_mm_mlp_adapter and model_args.unfreeze_vision_tower:
        raise ValueError("--unfreeze_vision_tower cannot be used in pretrain (--tune_mm_mlp_adapter True)")
    get_family(model_args.model_type)
    get_template(model_args.version)
    if not is_known_projector(model_args.mm_projector_type):
        raise ValueError(f"unknown --mm_projector_type {model_args.mm_projector_type!r}; known: {', '.join(PROJECTOR_TYPES)}")
    if model_args.attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"unknown --attn_implementation {model_args.attn_implementation!r}; "
                         f"known: {', '.join(ATTN_IMPLEMENTATIONS)}")
    if data_args.image_aspect_ratio not in ("square", "pad"):
        raise ValueError(f"unknown --image_aspect_ratio {data_args.image_aspect_ratio!r}; known: square, pad")
    for flag, path in (
        ("--model_name_or_path", model_args.model_name_or_path),
        ("--vision_tower", model_args.vision_tower),
        ("--data_path", data_args.data_path),
    ):
        if not path:
            raise ValueError(f"{flag} is required")
        if not Path(path).exists():
            raise FileNotFoundError(f"{flag} {path}: not found")
    if model_args.pretrain_mm_mlp_adapter and not Path(model_args.pretrain_mm_mlp_adapter).is_file():
        raise FileNotFoundError(f"--pretrain_mm_mlp_adapter {model_args.pretrain_mm_mlp_adapter}: file not found")
    if not 0 <= data_args.max_mismatch_fraction <= 1:
        raise ValueError("--max_mismatch_fraction must lie in [0, 1]")


def parse_args(argv: list[str]) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    argv = translate_legacy_flags(argv)
    argv = _resolve_deepspeed_flag(argv)
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    model_args, data_args, train_args = parser.parse_args_into_dataclasses(args=argv)
    if model_args.version is None:
        get_family(model_args.model_type)
        model_args.version = "plain" if model_args.tune_mm_mlp_adapter else default_template(model_args.model_type)
    check_flag_set(argv, model_args, data_args, train_args)
    if not torch.cuda.is_available():
        train_args.dataloader_pin_memory = False  # nothing to pin for; torch warns at every epoch otherwise
    return model_args, data_args, train_args


def _resolve_deepspeed_flag(argv: list[str]) -> list[str]:
    """``--deepspeed zero2`` names a config shipped with the package; a path stays a path."""
    out = list(argv)
    for i, arg in enumerate(out):
        name, eq, value = arg.partition("=")
        if name != "--deepspeed":
            continue
        if eq:
            out[i] = f"--deepspeed={resolve_deepspeed_config(value)}"
        elif i + 1 < len(out):
            out[i + 1] = str(resolve_deepspeed_config(out[i + 1]))
    return out
