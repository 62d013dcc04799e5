"""``merge_lora``: a LoRA run's output folder + its base LLM -> a complete model folder.

The output needs nothing but itself: weight shards with their index (LLM, the whole vision
tower, projector, named as the original Bunny names them), a config that embeds the tower's
config and carries the fields the original's loader reads, the tokenizer and the image processor.
It loads with ``AutoModelForCausalLM.from_pretrained`` after ``import bunny``. It is written
into a temporary folder beside the target and renamed into place once complete
(``bunny.fsutil.atomic_output_dir``), so a crash never leaves a folder that looks finished.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoImageProcessor, AutoTokenizer

from bunny.average import DEFAULT_MAX_SHARD_SIZE, AverageError, parse_size
from bunny.fsutil import atomic_output_dir
from bunny.merge.assemble import CheckedWeights, check_weights, load_unmerged_model, merge_adapter
from bunny.merge.inputs import (
    MergeError,
    check_base_model,
    check_output_path,
    existing_tower_folder,
    find_processor_folders,
    read_lora_run,
    resolve_dtype,
    resolve_frozen_tower,
)
from bunny.merge.shards import sharded_size, write_sharded
from bunny.model.compat import save_config
from bunny.fsutil import format_bytes, free_bytes, is_disk_full
from bunny.merge.space import check_free_space

logger = logging.getLogger("bunny.merge")


@dataclass(frozen=True)
class MergeResult:
    output_dir: Path
    shard_files: list[str]
    num_tensors: int
    total_size: int  # bytes of weights
    dtype: torch.dtype
    tower_trained: bool  # the tower's weights came from the run (unfrozen), not its original folder


def merge_lora(
    model_path: str | Path,
    model_base: str | Path,
    save_model_path: str | Path,
    model_type: str | None = None,
    *,
    dtype: str | None = None,
    vision_tower: str | Path | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    merge_method: str = "direct",
) -> MergeResult:
    """Merge the LoRA run in ``model_path`` (its output folder or a ``checkpoint-*``) into
    ``model_base`` and save the full model to ``save_model_path``.

    ``model_type``: the LLM family (``--model-type``; None: the run's own). ``dtype``: output
    precision (None: the run's training dtype). ``vision_tower``: the tower's folder when it
    is not where the run recorded it. ``merge_method``: see
    :func:`bunny.merge.assemble.merge_adapter` (``peft``: PEFT's own, for comparison).
    Raises ``MergeError`` for bad inputs, before the base model is loaded.
    """
    model_base = Path(model_base)
    try:
        max_shard_bytes = parse_size(max_shard_size)
    except AverageError as exc:
        raise MergeError(str(exc)) from exc
    run = read_lora_run(model_path, model_type, vision_tower)
    output = check_output_path(save_model_path, [run.folder, model_base], overwrite)
    base_config = check_base_model(model_base, run)
    out_dtype = resolve_dtype(dtype, run, base_config)
    weights = check_weights(run)
    needs_tower_folder = not weights.tower_trained or bool(weights.tower_unused_missing)
    tower_path = resolve_frozen_tower(run, vision_tower) if needs_tower_folder else None
    tower_folder = tower_path or existing_tower_folder(run, vision_tower)
    tokenizer_folder, processor_folder = find_processor_folders(run, model_base, tower_folder)
    needed, what = output_size(weights, out_dtype, max_shard_bytes, [tokenizer_folder, processor_folder])
    free = check_free_space(output, needed, what)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder))
    image_processor = AutoImageProcessor.from_pretrained(str(processor_folder))

    logger.info("loading %s (%s) with the tower from %s", model_base, out_dtype, tower_path or run.non_lora_file)
    model = load_unmerged_model(run, model_base, weights, tower_path, out_dtype)
    logger.info("merging the adapter of %s", run.folder)
    model = merge_adapter(model, weights, merge_method)
    config = model.config
    config.use_cache = True  # training turns the cache off; generation wants it
    config.dtype = out_dtype
    config.architectures = [type(model).__name__]
    # The original's loader takes the tower's weights from the checkpoint only when this is
    # set (else it reloads the base tower from mm_vision_tower): it must say what happened.
    config.unfreeze_vision_tower = weights.tower_trained
    if tower_path is not None and not weights.tower_trained:
        config.mm_vision_tower = str(tower_path)  # where the frozen tower's weights came from

    try:
        with atomic_output_dir(output, overwrite=overwrite) as temp:
            shard_files, num_tensors, total_size = write_sharded(model.state_dict(), temp, max_shard_bytes)
            save_config(config, temp)  # with the fields transformers 4 reads
            if model.can_generate():
                model.generation_config.save_pretrained(temp)
            tokenizer.save_pretrained(temp)
            image_processor.save_pretrained(temp)
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        raise MergeError(
            f"disk full while writing --save-model-path {output}: it needs {format_bytes(needed)} ({what}); "
            f"{format_bytes(free)} was free when the merge started, {format_bytes(free_bytes(output))} now. "
            "The partial output was removed."
        ) from exc
    return MergeResult(output, shard_files, num_tensors, total_size, out_dtype, weights.tower_trained)


NON_WEIGHT_ALLOWANCE = 64 * 1024  # config.json and generation_config.json: a few kB each


def output_size(
    weights: CheckedWeights, dtype: torch.dtype, max_shard_bytes: int, folders: list[Path]
) -> tuple[int, str]:
    """Bytes the merge writes, and what they are: the weight shards (data, headers, index),
    the configs, and the tokenizer and processor files (counted twice: a slow tokenizer's
    folder gains a tokenizer.json when saved)."""
    weight_bytes = sharded_size(weights.model_shapes, dtype, max_shard_bytes)
    copied = {
        path for folder in folders for path in folder.iterdir()
        if path.is_file() and path.name.startswith(PROCESSOR_FILE_PREFIXES)
    }
    other = NON_WEIGHT_ALLOWANCE + 2 * sum(path.stat().st_size for path in copied)
    return weight_bytes + other, f"weights {format_bytes(weight_bytes)}, configs, tokenizer and processor {format_bytes(other)}"


# Files that tokenizer.save_pretrained / image_processor.save_pretrained write.
PROCESSOR_FILE_PREFIXES = (
    "tokenizer", "special_tokens_map", "added_tokens", "vocab", "merges", "chat_template", "spiece",
    "preprocessor_config", "processor_config",
)
