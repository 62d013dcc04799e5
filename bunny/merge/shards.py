"""Writing a model's weights as safetensors shards plus their index, one tensor at a time.

``safetensors.torch.save_file`` first serialises a whole shard into one bytes object: a
5 GB shard would need 5 GB more memory than the model itself. Here the header is computed
from shapes and dtypes alone, and each tensor is asked for only when its bytes are due and
written as is: a model in memory costs nothing more to save, and a merge that computes its
tensors one by one (``bunny.merge.stream``) never holds more than one.

Layout (the same as ``bunny.average`` writes): ``model-0000i-of-0000N.safetensors`` shards of
at most ``max_shard_bytes`` (a larger tensor gets a shard of its own) and
``model.safetensors.index.json``, also when N is 1.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from bunny import safetensors_io
from bunny.average import INDEX_NAME, SAFETENSORS_DTYPES, SHARD_NAME
from bunny.fsutil import DirectFile

DTYPE_NAMES: dict[torch.dtype, str] = {info.torch_dtype: name for name, info in SAFETENSORS_DTYPES.items()}
TensorSpec = tuple[torch.dtype, tuple[int, ...]]  # dtype and shape: all a header needs


def _spec_nbytes(spec: TensorSpec) -> int:
    return math.prod(spec[1]) * spec[0].itemsize


def untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep one name per shared tensor (tied embeddings): safetensors stores no aliases, and
    loaders re-tie from the config. The first name, the tie's source, is kept."""
    seen: set[tuple] = set()
    kept = {}
    for name, tensor in state.items():
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        if tensor.numel() and identity in seen:
            continue
        seen.add(identity)
        kept[name] = tensor
    return kept


def plan_shards(specs: dict[str, TensorSpec], max_shard_bytes: int) -> list[list[str]]:
    """Names, in order, grouped into shards of at most ``max_shard_bytes``."""
    return safetensors_io.plan_shards({name: _spec_nbytes(spec) for name, spec in specs.items()}, max_shard_bytes)


def safetensors_header(tensors: dict[str, TensorSpec]) -> tuple[bytes, list[str]]:
    """The header of a safetensors file holding tensors of these dtypes and shapes, and the
    order their data follows in: wider dtypes first, so every tensor stays aligned."""
    for name, (dtype, _) in tensors.items():
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"{name}: dtype {dtype} cannot be stored in safetensors")
    order = safetensors_io.aligned_order(list(tensors), {name: dtype.itemsize for name, (dtype, _) in tensors.items()})
    layout = {name: (DTYPE_NAMES[tensors[name][0]], tensors[name][1], _spec_nbytes(tensors[name])) for name in order}
    return safetensors_io.header_bytes(layout), order


def write_safetensors(
    path: Path, specs: dict[str, TensorSpec], tensor_of: Callable[[str], torch.Tensor], workers: int = 1
) -> None:
    """One safetensors file: the header from ``specs``, then each tensor, asked of
    ``tensor_of`` only when its turn comes, written as is and dropped.

    ``workers`` threads compute the next tensors while one is being written (torch and file
    writes release the GIL), each with torch's intra-op parallelism off: side by side, their
    ops never wait at a barrier for a core that another process holds, as one op's threads
    do. At most ``workers + 1`` tensors are held. The file bypasses the page cache
    (``DirectFile``): the disk writes it while the next tensors are computed, and the final
    fsync finds nothing left to do.

    On a failed write (a full disk) the file is abandoned without a second error, so the
    caller sees the write's error, not one raised during clean-up."""
    header, order = safetensors_header(specs)
    threads = torch.get_num_threads()  # restored at the end: the workers' initializer sets the global count
    output = DirectFile(path)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="merge-tensor",
                              initializer=torch.set_num_threads, initargs=(1,))
    try:
        output.write(header)
        pending = deque(pool.submit(tensor_of, name) for name in order[:workers + 1])
        for position, name in enumerate(order):
            tensor = pending.popleft().result().detach()
            if position + len(pending) + 1 < len(order):
                pending.append(pool.submit(tensor_of, order[position + len(pending) + 1]))
            if (tensor.dtype, tuple(tensor.shape)) != specs[name]:
                raise RuntimeError(f"{name}: {tensor.dtype} {tuple(tensor.shape)}, the header says {specs[name]}")
            if tensor.device.type != "cpu":
                tensor = tensor.cpu()
            output.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())  # no copy when contiguous
            del tensor
        output.close()
    except BaseException:
        pool.shutdown(cancel_futures=True)
        output.abort()
        raise
    finally:
        pool.shutdown()
        torch.set_num_threads(threads)


def sharded_size(specs: dict[str, TensorSpec], max_shard_bytes: int) -> int:
    """Bytes ``write_sharded`` writes for tensors of these dtypes and shapes: data, every
    shard's header and the index."""
    plan = plan_shards(specs, max_shard_bytes)
    data = sum(_spec_nbytes(spec) for spec in specs.values())
    headers = sum(len(safetensors_header({name: specs[name] for name in names})[0]) for names in plan)
    weight_map = {name: SHARD_NAME.format(index=i + 1, total=len(plan)) for i, names in enumerate(plan) for name in names}
    return data + headers + len(safetensors_io.index_text(weight_map, data).encode("utf-8"))


def write_sharded_lazily(
    specs: dict[str, TensorSpec], tensor_of: Callable[[str], torch.Tensor], folder: Path, max_shard_bytes: int,
    workers: int = 1,
) -> tuple[list[str], int, int]:
    """Write the tensors ``specs`` describes (in that order, computed by ``tensor_of`` in
    ``workers`` threads) as shards plus index into ``folder``; returns (shard names, tensors, bytes)."""
    plan = plan_shards(specs, max_shard_bytes)
    names = [SHARD_NAME.format(index=i + 1, total=len(plan)) for i in range(len(plan))]
    weight_map = {}
    for shard_name, tensor_names in zip(names, plan):
        write_safetensors(folder / shard_name, {name: specs[name] for name in tensor_names}, tensor_of, workers=workers)
        weight_map.update(dict.fromkeys(tensor_names, shard_name))
    total_size = sum(_spec_nbytes(spec) for spec in specs.values())
    (folder / INDEX_NAME).write_text(safetensors_io.index_text(weight_map, total_size), encoding="utf-8")
    return names, len(specs), total_size


def write_sharded(state: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int) -> tuple[list[str], int, int]:
    """Write ``state`` (tensors in memory) as shards plus index into ``folder``."""
    state = untie(state)
    specs = {name: (tensor.dtype, tuple(tensor.shape)) for name, tensor in state.items()}
    return write_sharded_lazily(specs, state.__getitem__, folder, max_shard_bytes)
