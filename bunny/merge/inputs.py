"""The inputs of a merge, read and checked before anything heavy is loaded.

A LoRA run's output folder (or any of its ``checkpoint-*`` folders) is recognised by its
files, never by its name. Every problem found here is reported with the path and flag it
concerns, so a wrong flag costs seconds, not the minutes of loading a 4B model first.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig

from bunny.cli import UserError
from bunny.fsutil import output_folder_problem
from bunny.merge.options import DTYPE_ALIASES
from bunny.model.families import FAMILIES, LLMFamily, get_family
from bunny.model.multimodal import DEFAULT_SELECT_LAYER
from bunny.model.vision_tower import read_vision_config

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
NON_LORA_FILE = "non_lora_trainables.bin"
PROJECTOR_FILE = "mm_projector.bin"
CONFIG_FILE = "config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
PROCESSOR_CONFIG = "preprocessor_config.json"
LORA_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, NON_LORA_FILE, CONFIG_FILE)
DTYPES = {alias: getattr(torch, name) for alias, name in DTYPE_ALIASES.items()}
# Fields of the LLM's config that fix the shapes of its weights: base and adapter must agree.
SHAPE_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "vocab_size", "tie_word_embeddings",
)
# Fields of a tower's config that fix the shapes of its weights.
TOWER_SHAPE_FIELDS = (
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_channels", "image_size", "patch_size",
)
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class MergeError(UserError, ValueError):
    """An input or output path that makes the merge impossible or unsafe."""


@dataclass(frozen=True)
class LoraRun:
    """What one LoRA output folder holds: its Bunny config, adapter and non-LoRA weights."""

    folder: Path
    config: PretrainedConfig  # the run's Bunny config, vision_tower_config filled in (see read_lora_run)
    family: LLMFamily
    adapter_config: Path
    adapter_weights: Path
    non_lora_file: Path


def _describe_non_lora_folder(folder: Path) -> str:
    """Why ``folder`` is not a LoRA output, in the user's terms."""
    if (folder / PROJECTOR_FILE).is_file():
        return (f"--model-path {folder} is a pretrain output ({PROJECTOR_FILE}: projector only), "
                "not a LoRA output: there is no adapter to merge")
    if any(folder.glob("model*.safetensors*")) or (folder / "pytorch_model.bin").is_file():
        return f"--model-path {folder} holds full model weights, not a LoRA adapter: it needs no merge"
    checkpoints = sorted(
        (p for p in folder.iterdir() if _CHECKPOINT.match(p.name) and (p / ADAPTER_CONFIG).is_file()),
        key=lambda p: int(p.name.split("-")[1]),
    )
    hint = f"; its checkpoints {', '.join(p.name for p in checkpoints)} are: pass one of them" if checkpoints else ""
    return (f"--model-path {folder} is not a LoRA output folder: no {ADAPTER_CONFIG} "
            f"(expected {', '.join(LORA_FILES)}){hint}")


def read_lora_run(model_path: str | Path, model_type: str | None = None, vision_tower: str | Path | None = None) -> LoraRun:
    """Check a LoRA output folder's files and config; ``model_type`` (``--model-type``) must
    match the family the run was trained with (None: take it from the folder's config).

    This project's runs embed the tower's config; the original Bunny's name only its folder
    (``mm_vision_tower``), whose ``config.json`` is read then (``vision_tower``,
    ``--vision-tower``, replaces a folder that is not there)."""
    folder = Path(model_path)
    if folder.is_file():
        raise MergeError(f"--model-path {folder} is a file, not a folder: pass the LoRA run's output folder "
                         "(or one of its checkpoint-* folders)")
    if not folder.is_dir():
        raise MergeError(f"--model-path {folder}: folder not found")
    if not (folder / ADAPTER_CONFIG).is_file() and not (folder / ADAPTER_WEIGHTS).is_file():
        raise MergeError(_describe_non_lora_folder(folder))
    for name, what in (
        (ADAPTER_CONFIG, "adapter config"),
        (ADAPTER_WEIGHTS, "adapter weights"),
        (NON_LORA_FILE, "non-LoRA trainables (projector, unfrozen vision tower)"),
        (CONFIG_FILE, "Bunny model config"),
    ):
        if not (folder / name).is_file():
            raise MergeError(f"--model-path {folder}: missing {what} {folder / name}")
    try:
        peft_type = json.loads((folder / ADAPTER_CONFIG).read_text()).get("peft_type")
    except (OSError, ValueError, AttributeError) as exc:
        raise MergeError(f"--model-path {folder}: unreadable {folder / ADAPTER_CONFIG} ({exc})") from exc
    if peft_type != "LORA":
        raise MergeError(f"--model-path {folder}: {folder / ADAPTER_CONFIG} is a {peft_type!r} adapter, not LORA")

    known = {family.config_class.model_type: family for family in FAMILIES.values()}
    raw_type = json.loads((folder / CONFIG_FILE).read_text()).get("model_type")
    if raw_type not in known:
        raise MergeError(
            f"--model-path {folder}: {folder / CONFIG_FILE} has model_type {raw_type!r}, not a Bunny model "
            f"({', '.join(known)})"
        )
    family = known[raw_type]
    if model_type is not None:
        asked = _family(model_type)
        if asked is not family:
            raise MergeError(
                f"--model-type {model_type} does not match --model-path {folder}, which was trained as "
                f"{raw_type!r} (--model-type {family.name})"
            )
    config = AutoConfig.from_pretrained(str(folder))
    if not getattr(config, "vision_tower_config", None):
        config.vision_tower_config = _tower_config_from_folder(folder, config, vision_tower)
    if not getattr(config, "mm_vision_select_layer", None):
        config.mm_vision_select_layer = DEFAULT_SELECT_LAYER
    return LoraRun(folder, config, family, folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS, folder / NON_LORA_FILE)


def _tower_config_from_folder(folder: Path, config: PretrainedConfig, override: str | Path | None) -> dict:
    """The tower config of a run whose config only names the tower's folder (the original's)."""
    recorded = getattr(config, "mm_vision_tower", None)
    if override is not None:
        path, source = Path(override), "--vision-tower"
    elif recorded:
        path, source = Path(recorded), f"mm_vision_tower in {folder / CONFIG_FILE}"
    else:
        raise MergeError(f"--model-path {folder}: {folder / CONFIG_FILE} names no vision tower "
                         "(neither vision_tower_config nor mm_vision_tower)")
    if not path.is_dir():
        raise MergeError(
            f"{source} {str(path)!r} is not a local folder, and {folder / CONFIG_FILE} embeds no "
            "vision_tower_config: pass --vision-tower with the tower's folder"
        )
    try:
        return read_vision_config(path).to_dict()
    except (OSError, ValueError) as exc:
        raise MergeError(f"{source} {path}: {str(exc).removeprefix(f'--vision_tower {path}: ')}") from exc


def _family(model_type: str) -> LLMFamily:
    try:
        return get_family(model_type)
    except ValueError as exc:
        raise MergeError(str(exc).replace("--model_type", "--model-type")) from exc


def check_base_model(model_base: str | Path, run: LoraRun) -> PretrainedConfig:
    """The base LLM must be a plain checkpoint of the run's family with the same shapes."""
    base = Path(model_base)
    if base.is_file():
        raise MergeError(f"--model-base {base} is a file, not a folder: pass the base LLM's folder")
    if not base.is_dir():
        raise MergeError(f"--model-base {base}: folder not found")
    if not (base / CONFIG_FILE).is_file():
        raise MergeError(f"--model-base {base}: no {CONFIG_FILE} there (expected the base LLM's folder)")
    config = AutoConfig.from_pretrained(str(base))
    expected = run.family.base_model_type
    if config.model_type != expected:
        raise MergeError(
            f"--model-base {base} is a {config.model_type!r} model, but --model-type {run.family.name} "
            f"expects {expected!r}"
        )
    differing = [
        f"{field} {getattr(config, field, None)} vs {getattr(run.config, field, None)}"
        for field in SHAPE_FIELDS
        if getattr(config, field, None) != getattr(run.config, field, None)
    ]
    if differing:
        raise MergeError(
            f"--model-base {base} is not the LLM --model-path {run.folder} was trained on "
            f"(base vs run: {', '.join(differing)})"
        )
    return config


def resolve_frozen_tower(run: LoraRun, override: str | Path | None) -> Path:
    """Where a frozen tower's weights are: ``--vision-tower`` or the path the run recorded.

    A frozen tower is not in the run's outputs, so its original folder must still exist
    and must hold the tower the run was trained with."""
    recorded = getattr(run.config, "mm_vision_tower", None)
    if override is not None:
        path, source = Path(override), "--vision-tower"
    elif recorded:
        path, source = Path(recorded), f"mm_vision_tower in {run.folder / CONFIG_FILE}"
    else:
        raise MergeError(
            f"vision tower weights unavailable: --model-path {run.folder} trained with a frozen tower and "
            "records no mm_vision_tower; pass --vision-tower"
        )
    if not path.is_dir() and override is not None:
        raise MergeError(f"--vision-tower {path}: folder not found")
    if not path.is_dir():
        raise MergeError(
            f"vision tower weights unavailable: the tower was frozen during training, so its weights come "
            f"from its original folder {path} ({source}), which does not exist; pass --vision-tower with "
            "the folder it moved to"
        )
    try:
        found = read_vision_config(path).to_dict()
    except (OSError, ValueError) as exc:
        raise MergeError(f"{source} {path}: {str(exc).removeprefix(f'--vision_tower {path}: ')}") from exc
    trained = run.config.vision_tower_config
    differing = [
        f"{field} {found.get(field)} vs {trained.get(field)}"
        for field in TOWER_SHAPE_FIELDS
        if found.get(field) != trained.get(field)
    ]
    if differing:
        raise MergeError(
            f"{source} {path} is not the vision tower --model-path {run.folder} was trained with "
            f"(folder vs run: {', '.join(differing)})"
        )
    return path


def existing_tower_folder(run: LoraRun, override: str | Path | None) -> Path | None:
    """``--vision-tower`` or the recorded tower folder, when it exists (the image processor's
    fallback source: the original Bunny's LoRA runs do not save it)."""
    for candidate in (override, getattr(run.config, "mm_vision_tower", None)):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


def resolve_dtype(name: str | None, run: LoraRun, base_config: PretrainedConfig) -> torch.dtype:
    """``--dtype``, else the dtype the run trained in (its config), else the base's, else float32."""
    if name is not None:
        if name not in DTYPES:
            raise MergeError(f"--dtype {name!r}: choose one of {', '.join(DTYPES)}")
        return DTYPES[name]
    for config in (run.config, base_config):
        value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(value, torch.dtype) and value.is_floating_point:
            return value
        if isinstance(value, str) and value in DTYPES:
            return DTYPES[value]
    return torch.float32


def find_processor_folders(run: LoraRun, model_base: Path, tower: Path | None) -> tuple[Path, Path]:
    """Folders to take the tokenizer and the image processor from: the run's own copies,
    else the base LLM's tokenizer and the original tower's processor."""
    tokenizer = run.folder if (run.folder / TOKENIZER_CONFIG).is_file() else model_base
    if not (tokenizer / TOKENIZER_CONFIG).is_file():
        raise MergeError(f"no tokenizer: neither --model-path {run.folder} nor --model-base {model_base} "
                         f"holds {TOKENIZER_CONFIG}")
    candidates = [run.folder] + ([tower] if tower is not None else [])
    for folder in candidates:
        if (folder / PROCESSOR_CONFIG).is_file():
            return tokenizer, folder
    raise MergeError(f"no image processor: {' nor '.join(str(f / PROCESSOR_CONFIG) for f in candidates)} exists")


def check_output_path(output: str | Path, inputs: list[Path], overwrite: bool) -> Path:
    """Refuse an existing output (unless ``overwrite``) and one that overlaps an input."""
    output = Path(output)
    if problem := output_folder_problem(output, inputs, overwrite, "--save-model-path"):
        raise MergeError(problem)
    return output
