"""The safetensors layout shared by this project's two writers, ``bunny.average`` and
``bunny.merge.shards``: which tensors go in which shard, a file's header, the index.

Torch-free (dtypes by their safetensors names), so ``bunny.average`` imports it at no cost.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence

# name -> (safetensors dtype name, shape, bytes)
TensorLayout = Mapping[str, tuple[str, Sequence[int], int]]


def plan_shards(sizes: Mapping[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Names, in order, grouped into shards of at most ``max_shard_bytes`` bytes (``sizes``:
    name -> bytes); a larger tensor gets a shard of its own."""
    shards: list[list[str]] = []
    size = 0
    for name, nbytes in sizes.items():
        if not shards or (shards[-1] and size + nbytes > max_shard_bytes):
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def aligned_order(names: Sequence[str], itemsize: Mapping[str, int]) -> list[str]:
    """The order tensors' data follows in a file: wider dtypes first (stable), so that every
    tensor starts at a multiple of its own item size."""
    return sorted(names, key=lambda name: -itemsize[name])


def header_bytes(tensors: TensorLayout) -> bytes:
    """A safetensors file's header for these tensors, their data following in this order:
    the 8-byte length, then the JSON padded with spaces to a multiple of 8."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape, nbytes) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded


def index_text(weight_map: Mapping[str, str], total_size: int) -> str:
    """``model.safetensors.index.json``: tensor name -> shard, sorted, and the bytes of data."""
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    return json.dumps(index, indent=2) + "\n"
