"""``merge_lora``: a LoRA run's output folder + its base LLM -> a complete model folder.

The output needs nothing but itself: weight shards with their index (LLM, vision tower,
projector), a config that embeds the tower's config, the tokenizer and the image processor.
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
from bunny.merge.assemble import check_weights, load_unmerged_model, merge_adapter
from bunny.merge.inputs import (
    MergeError,
    check_base_model,
    check_output_path,
    find_processor_folders,
    read_lora_run,
    resolve_dtype,
    resolve_frozen_tower,
)
from bunny.merge.shards import write_sharded

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
) -> MergeResult:
    """Merge the LoRA run in ``model_path`` (its output folder or a ``checkpoint-*``) into
    ``model_base`` and save the full model to ``save_model_path``.

    ``model_type``: the LLM family (``--model-type``; None: the run's own). ``dtype``: output
    precision (None: the run's training dtype). ``vision_tower``: the frozen tower's folder
    when it is no longer where the run recorded it. Raises ``MergeError`` for bad inputs,
    before the base model is loaded.
    """
    model_base = Path(model_base)
    try:
        max_shard_bytes = parse_size(max_shard_size)
    except AverageError as exc:
        raise MergeError(str(exc)) from exc
    run = read_lora_run(model_path, model_type)
    output = check_output_path(save_model_path, [run.folder, model_base], overwrite)
    base_config = check_base_model(model_base, run)
    out_dtype = resolve_dtype(dtype, run, base_config)
    weights = check_weights(run)
    tower_path = None if weights.tower_trained else resolve_frozen_tower(run, vision_tower)
    tokenizer_folder, processor_folder = find_processor_folders(run, model_base, tower_path)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder))
    image_processor = AutoImageProcessor.from_pretrained(str(processor_folder))

    logger.info("loading %s (%s) with the tower from %s", model_base, out_dtype, tower_path or run.non_lora_file)
    model = load_unmerged_model(run, model_base, weights, tower_path, out_dtype)
    logger.info("merging the adapter of %s", run.folder)
    model = merge_adapter(model, weights)
    config = model.config
    config.use_cache = True  # training turns the cache off; generation wants it
    config.dtype = out_dtype
    config.architectures = [type(model).__name__]
    if tower_path is not None:
        config.mm_vision_tower = str(tower_path)  # where the frozen tower's weights came from (provenance only)

    with atomic_output_dir(output, overwrite=overwrite) as temp:
        shard_files, num_tensors, total_size = write_sharded(model.state_dict(), temp, max_shard_bytes)
        config.save_pretrained(temp)
        if model.can_generate():
            model.generation_config.save_pretrained(temp)
        tokenizer.save_pretrained(temp)
        image_processor.save_pretrained(temp)
    return MergeResult(output, shard_files, num_tensors, total_size, out_dtype, weights.tower_trained)
