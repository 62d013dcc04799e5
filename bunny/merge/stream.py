"""The merge as a stream of tensors: no model is built, no weight is held twice.

Every tensor of the merged model comes from one place, decided up front (:func:`plan_merge`):
the run's ``non_lora_trainables.bin`` (projector, an unfrozen tower), else the frozen tower's
folder (tower tensors), else the base LLM's safetensors shards. Base and tower tensors are
read one at a time, by byte offset, into memory of their own (a page-cache copy, never an
mmap that would stay resident); a LoRA target becomes ``W + scale * B @ A`` (``W`` in the
output dtype, as PEFT's merge of a model loaded in it sees it), computed in float32 a block
of rows at a time and rounded once to the output dtype; and each tensor goes straight into
an output shard whose header was computed from the plan (``bunny.merge.shards``), then is
freed. Peak memory is the adapter, the non-LoRA trainables and about one copy of the largest
tensor, whatever the size of the model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from bunny.average import INDEX_NAME, SAFETENSORS_DTYPES, SINGLE_NAME, AverageError, TensorEntry, read_checkpoint
from bunny.merge.adapter import LoraLayer, key_problems, list_keys
from bunny.merge.inputs import MergeError

logger = logging.getLogger("bunny.merge")

TOWER_PREFIX = "model.vision_tower."
TOWER_MODEL_PREFIX = "model.vision_tower.vision_tower.vision_model."
BLOCK_ELEMENTS = 2**22  # elements per block of the LoRA update: 16 MB of float32


def has_safetensors(folder: Path) -> bool:
    return (folder / INDEX_NAME).is_file() or (folder / SINGLE_NAME).is_file()


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: where its values come from, and the LoRA update it gets, if any."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    source: TensorEntry | torch.Tensor
    owner: str  # the input named in an error about the source ("--model-base /x", ...)
    lora: LoraLayer | None = None


def _read_checkpoint(folder: Path, what: str) -> dict[str, TensorEntry]:
    try:
        return read_checkpoint(folder).tensors
    except AverageError as exc:
        raise MergeError(f"{what}: {exc}") from exc


def plan_merge(
    shapes: dict[str, tuple[int, ...]],
    dtype: torch.dtype,
    non_lora: dict[str, torch.Tensor],
    lora: dict[str, LoraLayer],
    model_base: Path,
    tower_path: Path | None,
) -> dict[str, PlannedTensor]:
    """The source of every output tensor (``shapes``: the output's names and shapes, in order;
    floating-point ones are written in ``dtype``, others as they are). Raises a MergeError
    naming every tensor no input provides, before anything is written."""
    base_owner = f"--model-base {model_base}"
    base = _read_checkpoint(model_base, base_owner)
    tower_owner = f"vision tower {tower_path}"
    tower = _read_checkpoint(tower_path, tower_owner) if tower_path is not None else {}
    plan: dict[str, PlannedTensor] = {}
    missing_base, missing_tower, wrong_shape = [], [], []
    for name, shape in shapes.items():
        if name in non_lora:
            source, owner = non_lora[name], "non_lora_trainables.bin"
        elif name.startswith(TOWER_PREFIX):
            relative = name.removeprefix(TOWER_MODEL_PREFIX)
            # Under vision_model. (transformers 4, two-tower checkpoints) or not (transformers 5).
            source, owner = tower.get("vision_model." + relative, tower.get(relative)), tower_owner
            if source is None:
                missing_tower.append(relative)
                continue
        else:
            source, owner = base.get(name), base_owner
            if source is None:
                missing_base.append(name)
                continue
        if tuple(source.shape) != shape:
            wrong_shape.append(f"{name}: {owner} {tuple(source.shape)} vs model {shape}")
            continue
        layer = lora.get(name.removesuffix(".weight")) if name.endswith(".weight") else None
        is_float = source.is_floating_point() if isinstance(source, torch.Tensor) else SAFETENSORS_DTYPES[source.dtype].is_float
        out_dtype = dtype if is_float else _torch_dtype(source)
        plan[name] = PlannedTensor(out_dtype, shape, source, owner, layer)
    if missing_tower:
        raise MergeError(f"{tower_owner} lacks weights of the tower: {list_keys(missing_tower)}")
    if missing_base or wrong_shape:
        raise MergeError(f"{base_owner}: its weights do not fit the model "
                         + key_problems(("missing", missing_base), ("mismatched", wrong_shape)))
    unplaced = sorted(set(lora) - {name.removesuffix(".weight") for name, item in plan.items() if item.lora is not None})
    if unplaced:  # checked against the model already: a bug if it happens
        raise RuntimeError(f"LoRA layers without a weight in the output: {list_keys(unplaced)}")
    return plan


def _torch_dtype(source: TensorEntry | torch.Tensor) -> torch.dtype:
    return source.dtype if isinstance(source, torch.Tensor) else SAFETENSORS_DTYPES[source.dtype].torch_dtype


class TensorReader:
    """Reads planned tensors one at a time, keeping each input file open once."""

    def __init__(self) -> None:
        self._files: dict[Path, BinaryIO] = {}

    def read(self, entry: TensorEntry) -> torch.Tensor:
        tensor = torch.empty(entry.shape, dtype=_torch_dtype(entry))
        if entry.nbytes:
            handle = self._files.get(entry.file)
            if handle is None:
                handle = self._files[entry.file] = open(entry.file, "rb", buffering=0)
            handle.seek(entry.start)
            view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
            if handle.readinto(view) != entry.nbytes:
                raise MergeError(f"{entry.file}: cut short while reading {entry.name}")
        return tensor

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()


def merged_tensor(item: PlannedTensor, reader: TensorReader, name: str) -> torch.Tensor:
    """One output tensor: the source in the output dtype (as a model loaded in that dtype
    holds it), plus its LoRA update; refused when not finite (a NaN or inf input, or an
    overflow in the cast)."""
    source = item.source if isinstance(item.source, torch.Tensor) else reader.read(item.source)
    merged = source.to(item.dtype)
    if item.lora is not None:
        if merged is item.source:  # a tensor of non_lora_trainables.bin: not ours to change
            merged = merged.clone()
        add_lora_(merged, item.lora)
    if merged.is_floating_point() and not all_finite(merged):
        if source.is_floating_point() and not all_finite(source):
            raise MergeError(f"{item.owner} holds NaN or inf values in {name}: refusing to merge them")
        raise MergeError(f"merging {name} gives values beyond {item.dtype}'s range: merge in a wider --dtype")
    return merged


def add_lora_(weight: torch.Tensor, layer: LoraLayer) -> None:
    """``weight += scale * up @ down``, in place, a block of rows at a time: each block is
    widened to float32, updated by one ``addmm`` and rounded back once. The float32 copy is
    a block (``BLOCK_ELEMENTS``), never the whole weight."""
    down, up = layer.down.to(torch.float32), layer.up.to(torch.float32)
    rows = max(1, BLOCK_ELEMENTS // max(1, weight.shape[1]))
    for start in range(0, weight.shape[0], rows):
        block = weight[start:start + rows]
        block.copy_(torch.addmm(block.to(torch.float32), up[start:start + rows], down, alpha=layer.scale))


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or inf: the smallest and largest values say it (``aminmax`` propagates NaN), in
    one pass without temporaries; ``isfinite`` is several times slower on 16-bit floats and
    makes a tensor of flags."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def tensor_source(plan: dict[str, PlannedTensor]) -> tuple[Callable[[str], torch.Tensor], Callable[[], None]]:
    """``(tensor_of, close)``: the merged tensor of a name, computed on demand."""
    reader = TensorReader()
    return (lambda name: merged_tensor(plan[name], reader, name)), reader.close
