"""The merge as a stream of tensors: no model is built, no weight is held twice.

Every tensor of the merged model comes from one place, decided up front (:func:`plan_merge`):
the run's ``non_lora_trainables.bin`` (projector, an unfrozen tower), else the frozen tower's
folder (tower tensors), else the base LLM's safetensors shards. Base and tower tensors are
read one at a time, by byte offset, into memory of their own (a page-cache copy, never an
mmap that would stay resident); a LoRA target becomes ``W + scale * B @ A`` (``W`` in the
output dtype, as PEFT's merge of a model loaded in it sees it), computed in float32 a block
of rows at a time and rounded once to the output dtype; and each tensor goes straight into
an output shard whose header was computed from the plan (``bunny.merge.shards``), then is
freed. Peak memory is the adapter, the non-LoRA trainables and a few of the largest tensors
(one per worker computing them, ``bunny.merge.shards.write_safetensors``), whatever the size
of the model.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from bunny.average import INDEX_NAME, SAFETENSORS_DTYPES, SINGLE_NAME, AverageError, TensorEntry, read_checkpoint
from bunny.merge.adapter import LoraLayer, key_problems, list_keys
from bunny.merge.inputs import MergeError

logger = logging.getLogger("bunny.merge")

TOWER_PREFIX = "model.vision_tower."
TOWER_MODEL_PREFIX = "model.vision_tower.vision_tower.vision_model."
BLOCK_ELEMENTS = 2**20  # elements per block of the LoRA update: 4 MB of float32, cache-sized


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
    """Reads planned tensors, keeping each input file open once. Reads are positional
    (``preadv``, no shared file offset), so several threads may read at the same time."""

    def __init__(self) -> None:
        self._files: dict[Path, int] = {}
        self._lock = threading.Lock()

    def read(self, entry: TensorEntry) -> torch.Tensor:
        tensor = torch.empty(entry.shape, dtype=_torch_dtype(entry))
        if entry.nbytes:
            view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
            fd, done = self._fd(entry.file), 0
            while done < entry.nbytes:
                got = os.preadv(fd, [view[done:]], entry.start + done)
                if got == 0:
                    raise MergeError(f"{entry.file}: cut short while reading {entry.name}")
                done += got
        return tensor

    def _fd(self, path: Path) -> int:
        with self._lock:
            if path not in self._files:
                self._files[path] = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            return self._files[path]

    def close(self) -> None:
        with self._lock:
            for fd in self._files.values():
                os.close(fd)
            self._files.clear()


def merged_tensor(item: PlannedTensor, reader: TensorReader, name: str) -> torch.Tensor:
    """One output tensor: the source in the output dtype (as a model loaded in that dtype
    holds it), plus its LoRA update; refused when not finite (a NaN or inf input, or an
    overflow in the cast). A tensor of ``non_lora_trainables.bin`` was screened when loaded:
    it is screened again only when its values change (a LoRA update, a narrowing cast)."""
    source = item.source if isinstance(item.source, torch.Tensor) else reader.read(item.source)
    merged = source.to(item.dtype)
    if item.lora is not None:
        if merged is item.source:  # a tensor of non_lora_trainables.bin: not ours to change
            merged = merged.clone()
        add_lora_(merged, item.lora)
    screened = merged is item.source or (
        source is item.source and item.lora is None and _widens(source.dtype, merged.dtype))
    if merged.is_floating_point() and not screened and not all_finite(merged):
        if source.is_floating_point() and not all_finite(source):
            raise MergeError(f"{item.owner} holds NaN or inf values in {name}: refusing to merge them")
        raise MergeError(f"merging {name} gives values beyond {item.dtype}'s range: merge in a wider --dtype")
    return merged


def _widens(source: torch.dtype, target: torch.dtype) -> bool:
    """A cast that keeps every finite value finite (bf16/fp16 -> float32, fp16 -> bf16 too)."""
    return source == target or target == torch.float64 or (
        target == torch.float32 and source in (torch.float16, torch.bfloat16)) or (
        target == torch.bfloat16 and source == torch.float16)


def add_lora_(weight: torch.Tensor, layer: LoraLayer) -> None:
    """``weight += scale * up @ down``, in place, a block of rows at a time: each block is
    widened into one float32 buffer, updated there by ``addmm_`` (the GEMM accumulates into
    it: no temporary of the update) and rounded back once. The buffer is a block
    (``BLOCK_ELEMENTS``, sized to stay in cache), reused from block to block."""
    down, up = layer.down.to(torch.float32), layer.up.to(torch.float32)
    rows = max(1, BLOCK_ELEMENTS // max(1, weight.shape[1]))
    buffer = torch.empty((min(rows, weight.shape[0]), weight.shape[1]), dtype=torch.float32)
    for start in range(0, weight.shape[0], rows):
        block = weight[start:start + rows]
        wide = buffer[:block.shape[0]]
        if block.dtype == torch.float32:
            wide = block  # updated in place: the same arithmetic, no copy
        else:
            wide.copy_(block)
        wide.addmm_(up[start:start + rows], down, alpha=layer.scale)
        if wide is not block:
            block.copy_(wide)


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
