"""``merge_lora``: a LoRA run's output folder + its base LLM -> a complete model folder.

The output needs nothing but itself: weight shards with their index (LLM, the whole vision
tower, projector, named as the original Bunny names them), a config that embeds the tower's
config and carries the fields the original's loader reads, the tokenizer and the image processor.
It loads with ``AutoModelForCausalLM.from_pretrained`` after ``import bunny``. It is written
into a temporary folder beside the target and renamed into place once complete
(``bunny.fsutil.atomic_output_dir``), so a crash never leaves a folder that looks finished.

The weights are merged as a stream (``bunny.merge.stream``: tensor by tensor from the input
files to the output shards, no model built, PEFT not imported); adapters with features that
stream does not merge, inputs without safetensors files, and ``merge_method="peft"`` go
through PEFT's merge of a model in memory (``bunny.merge.assemble``).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoImageProcessor, AutoTokenizer, GenerationConfig, PretrainedConfig

from bunny.average import DEFAULT_MAX_SHARD_SIZE, AverageError, parse_size
from bunny.fsutil import atomic_output_dir, format_bytes, free_bytes, is_disk_full
from bunny.merge.assemble import CheckedWeights, check_weights, load_unmerged_model, merge_with_peft
from bunny.merge.inputs import (
    LoraRun,
    MergeError,
    check_base_model,
    check_output_path,
    existing_tower_folder,
    find_processor_folders,
    read_lora_run,
    resolve_dtype,
    resolve_frozen_tower,
)
from bunny.merge.options import MERGE_METHODS
from bunny.merge.shards import TensorSpec, sharded_size, write_sharded, write_sharded_lazily
from bunny.merge.space import check_free_space
from bunny.merge.stream import has_safetensors, plan_merge, tensor_source
from bunny.model.compat import save_config

logger = logging.getLogger("bunny.merge")
MAX_WORKERS = 8  # threads computing merged tensors side by side


@dataclass(frozen=True)
class MergeResult:
    output_dir: Path
    shard_files: list[str]
    num_tensors: int
    total_size: int  # bytes of weights
    dtype: torch.dtype
    tower_trained: bool  # the tower's weights came from the run (unfrozen), not its original folder
    method: str = "stream"  # how the weights were merged: "stream" or "peft"


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
    merge_method: str = "stream",
) -> MergeResult:
    """Merge the LoRA run in ``model_path`` (its output folder or a ``checkpoint-*``) into
    ``model_base`` and save the full model to ``save_model_path``.

    ``model_type``: the LLM family (``--model-type``; None: the run's own). ``dtype``: output
    precision (None: the run's training dtype). ``vision_tower``: the tower's folder when it
    is not where the run recorded it. ``merge_method``: ``stream`` (where the adapter and the
    inputs allow it, else PEFT's) or ``peft`` (PEFT's own, for comparison).
    Raises ``MergeError`` for bad inputs, before any weight is written.
    """
    if merge_method not in MERGE_METHODS:
        raise ValueError(f"merge method {merge_method!r}: choose one of {', '.join(MERGE_METHODS)}")
    model_base = Path(model_base)
    try:
        max_shard_bytes = parse_size(max_shard_size)
    except AverageError as exc:
        raise MergeError(str(exc)) from exc
    run = read_lora_run(model_path, model_type, vision_tower)
    output = check_output_path(save_model_path, [run.folder, model_base], overwrite)
    base_config = check_base_model(model_base, run)
    out_dtype = resolve_dtype(dtype, run, base_config)
    weights = check_weights(run, through_peft=merge_method == "peft")
    needs_tower_folder = not weights.tower_trained or bool(weights.tower_unused_missing)
    tower_path = resolve_frozen_tower(run, vision_tower) if needs_tower_folder else None
    tower_folder = tower_path or existing_tower_folder(run, vision_tower)
    tokenizer_folder, processor_folder = find_processor_folders(run, model_base, tower_folder)
    shapes = {name: weights.model_shapes[name] for name in weights.output_names}
    reason = weights.peft_reason or next(
        (f"{what} {folder} has no safetensors files" for what, folder in (("--model-base", model_base), ("vision tower", tower_path))
         if folder is not None and not has_safetensors(folder)), None)
    if reason is None:
        plan = plan_merge(shapes, out_dtype, weights.non_lora, weights.lora_layers, model_base, tower_path)
        specs: dict[str, TensorSpec] = {name: (item.dtype, item.shape) for name, item in plan.items()}
    else:
        specs = {name: (out_dtype, shape) for name, shape in shapes.items()}
    needed, what = output_size(specs, max_shard_bytes, [tokenizer_folder, processor_folder])
    free = check_free_space(output, needed, what)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder))
    image_processor = AutoImageProcessor.from_pretrained(str(processor_folder))
    config = merged_config(run, out_dtype, weights, tower_path)

    if reason is None:
        logger.info("merging %s into %s (%s), tensor by tensor", run.folder, model_base, out_dtype)
        tensor_of, close_inputs = tensor_source(plan)
        # One tensor per core at a time instead of one op over all cores; each worker holds a
        # tensor, so at most MAX_WORKERS + 1 (a few largest tensors) are in memory at once.
        workers = min(torch.get_num_threads(), MAX_WORKERS)
        write_weights = lambda folder: write_sharded_lazily(specs, tensor_of, folder, max_shard_bytes, workers)  # noqa: E731
    else:
        logger.info("merging through PEFT (%s): loading %s (%s) with the tower from %s",
                    reason, model_base, out_dtype, tower_path or run.non_lora_file)
        model = merge_with_peft(load_unmerged_model(run, model_base, weights, tower_path, out_dtype), run, weights)
        close_inputs = lambda: None  # noqa: E731
        write_weights = lambda folder: write_sharded(model.state_dict(), folder, max_shard_bytes)  # noqa: E731

    try:
        with atomic_output_dir(output, overwrite=overwrite) as temp:
            try:
                shard_files, num_tensors, total_size = write_weights(temp)
            finally:
                close_inputs()
            save_config(config, temp)  # with the fields transformers 4 reads
            if run.family.causal_lm_class.can_generate():
                base_generation_config(model_base).save_pretrained(temp)
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
    method = "stream" if reason is None else "peft"
    return MergeResult(output, shard_files, num_tensors, total_size, out_dtype, weights.tower_trained, method)


def merged_config(run: LoraRun, dtype: torch.dtype, weights: CheckedWeights, tower_path: Path | None) -> PretrainedConfig:
    """The run's config, as the merged model's."""
    config = copy.deepcopy(run.config)
    config.use_cache = True  # training turns the cache off; generation wants it
    config.dtype = dtype
    config.architectures = [run.family.causal_lm_class.__name__]
    # The original's loader takes the tower's weights from the checkpoint only when this is
    # set (else it reloads the base tower from mm_vision_tower): it must say what happened.
    config.unfreeze_vision_tower = weights.tower_trained
    if tower_path is not None and not weights.tower_trained:
        config.mm_vision_tower = str(tower_path)  # where the frozen tower's weights came from
    return config


def base_generation_config(model_base: Path) -> GenerationConfig:
    """The base LLM's generation config, as ``from_pretrained`` gives it to the model: its
    ``generation_config.json``, else one made from its ``config.json``."""
    try:
        return GenerationConfig.from_pretrained(str(model_base))
    except OSError:
        return GenerationConfig.from_pretrained(str(model_base), config_file_name="config.json", _from_model_config=True)


NON_WEIGHT_ALLOWANCE = 64 * 1024  # config.json and generation_config.json: a few kB each


def output_size(specs: dict[str, TensorSpec], max_shard_bytes: int, folders: list[Path]) -> tuple[int, str]:
    """Bytes the merge writes, and what they are: the weight shards (data, headers, index),
    the configs, and the tokenizer and processor files (counted twice: a slow tokenizer's
    folder gains a tokenizer.json when saved)."""
    weight_bytes = sharded_size(specs, max_shard_bytes)
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
