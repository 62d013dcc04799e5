"""Streaming weighted average of model folders (Bunny's final recipe-1/recipe-2 step).

The tutorial loads whole shards of both models, averages them and saves the result, which
needs three shards' worth of memory and identical shard layouts. Here the input files are
memory-mapped and every tensor is averaged in cache-sized chunks straight from the page cache
(no copy; each chunk's pages are unmapped once averaged); the weighted sum is accumulated in
float32 (float64 for float64 inputs) and converted back to the input dtype; and the output's
safetensors headers are computed up front so the bytes stream to disk as they are computed
(written back window by window, so the final fsync has little left), with faulting the inputs
in and writing overlapped with the arithmetic. Peak memory is a few chunks (a few MB),
whatever the size of the model, of its shards or of its tensors.

Every check (weights, shard presence and integrity, tensor names, shapes, dtypes, the
output path, the free space for every file written) runs before the first byte is written,
and the output folder only appears, through `bunny.fsutil.atomic_output_dir`, once it is
complete. Inputs of weight 0 contribute their headers to these checks but none of their
tensor data is read (0 x NaN would be NaN). Non-finite values (NaN, inf) in an input are
found while streaming, named by tensor and file, and nothing is written; so is a disk that
fills up mid-write (one error naming the output, the bytes it needed and those free).

Output layout: `model-0000i-of-0000N.safetensors` shards of at most `max_shard_size` bytes
(default "5GB", the size of the shards the tutorial's checkpoints come in; a tensor larger
than that gets a shard of its own) plus `model.safetensors.index.json`, written even when
N is 1. Every other file of the `inherit_from` input (config, tokenizer, processor,
generation config, ...) is copied alongside.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import mmap
import os
import re
import shutil
import struct
import sys
import time
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bunny import safetensors_io
from bunny.cli import UserError, add_debug_flag, run_cli
from bunny.fsutil import (
    DirectFile,
    atomic_output_dir,
    format_bytes,
    free_bytes,
    free_space_problem,
    is_disk_full,
    output_folder_problem,
)

if TYPE_CHECKING:
    import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
SHARD_NAME = "model-{index:05d}-of-{total:05d}.safetensors"
# Weight files never inherited: the input's own shards would contradict the averaged ones.
WEIGHT_FILE_PATTERN = re.compile(
    r"(model(-\d+-of-\d+)?\.safetensors|pytorch_model(-\d+-of-\d+)?\.bin)(\.index\.json)?"
)
DEFAULT_MAX_SHARD_SIZE = "5GB"
DEFAULT_TWO_WEIGHTS = (0.3, 0.7)
# Elements per pipeline step: 1 MB of bf16 per input and 2 MB of float32 accumulator stay
# in cache between the read, the arithmetic and the write (measured fastest, 2**18..2**22).
DEFAULT_CHUNK_ELEMENTS = 2**19
WEIGHT_SUM_TOLERANCE = 1e-6
# 16-bit floats whose bits, sign masked off, are at least this are NaN or inf.
NONFINITE_BITS = {"bfloat16": 0x7F80, "float16": 0x7C00}  # by dtype name: torch is imported lazily
MAX_HEADER_BYTES = 100 * 2**20
# Two output buffers of this size per shard being written: one filled while the disk takes
# the other (O_DIRECT, see DirectFile); large requests keep the disk streaming.
OUTPUT_BUFFER_BYTES = 32 * 2**20
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux >= 5.14; Python 3.11 lacks the name


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")
MAX_LISTED_NAMES = 10


@dataclass(frozen=True)
class DtypeInfo:
    itemsize: int
    torch_name: str  # torch is imported on first use: ``--help`` should not wait for it
    is_float: bool

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.torch_name)


SAFETENSORS_DTYPES: dict[str, DtypeInfo] = {
    "F64": DtypeInfo(8, "float64", True),
    "F32": DtypeInfo(4, "float32", True),
    "F16": DtypeInfo(2, "float16", True),
    "BF16": DtypeInfo(2, "bfloat16", True),
    "F8_E4M3": DtypeInfo(1, "float8_e4m3fn", True),
    "F8_E5M2": DtypeInfo(1, "float8_e5m2", True),
    "I64": DtypeInfo(8, "int64", False),
    "U64": DtypeInfo(8, "uint64", False),
    "I32": DtypeInfo(4, "int32", False),
    "U32": DtypeInfo(4, "uint32", False),
    "I16": DtypeInfo(2, "int16", False),
    "U16": DtypeInfo(2, "uint16", False),
    "I8": DtypeInfo(1, "int8", False),
    "U8": DtypeInfo(1, "uint8", False),
    "BOOL": DtypeInfo(1, "bool", False),
}


class AverageError(UserError, ValueError):
    """An input, weight or output path that makes the average impossible or unsafe."""


class NonFiniteInputError(AverageError):
    """An input holds NaN or inf where its weight would carry it into the average."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes lie: `nbytes` bytes at absolute offset `start` of `file`."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int
    nbytes: int


@dataclass(frozen=True)
class Checkpoint:
    """A model folder's tensors, in file-then-offset order, and the files that hold them."""

    folder: Path
    tensors: dict[str, TensorEntry]
    weight_files: frozenset[str]


@dataclass(frozen=True)
class AverageResult:
    output_dir: Path
    shard_files: list[str]
    num_tensors: int
    total_size: int


def _format_names(names: Sequence[str]) -> str:
    shown = ", ".join(sorted(names)[:MAX_LISTED_NAMES])
    hidden = len(names) - MAX_LISTED_NAMES
    return shown + (f" ... and {hidden} more" if hidden > 0 else "")


def read_safetensors_header(path: Path) -> list[TensorEntry]:
    """Parse and check one safetensors file's header against the file's actual size.

    A shard cut short by a failed copy or download is caught here, before any averaging,
    because every tensor's `data_offsets` must lie inside the file.
    """
    if not path.is_file():
        raise AverageError(f"missing shard: {path}")
    file_size = path.stat().st_size
    if file_size < 8:
        raise AverageError(f"truncated shard {path}: {file_size} bytes, no safetensors header")
    with open(path, "rb") as handle:
        (header_size,) = struct.unpack("<Q", handle.read(8))
        if header_size > MAX_HEADER_BYTES or 8 + header_size > file_size:
            raise AverageError(
                f"truncated or corrupt shard {path}: header claims {header_size} bytes, "
                f"file has {file_size}"
            )
        raw_header = handle.read(header_size)
    try:
        header = json.loads(raw_header)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AverageError(f"corrupt shard {path}: header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise AverageError(f"corrupt shard {path}: header is not a JSON object")
    data_start = 8 + header_size
    entries = []
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = spec["dtype"], tuple(spec["shape"]), spec["data_offsets"]
        except (TypeError, KeyError, ValueError) as exc:
            raise AverageError(f"corrupt shard {path}: bad header entry for {name}") from exc
        info = SAFETENSORS_DTYPES.get(dtype)
        if info is None:
            raise AverageError(f"shard {path}: tensor {name} has unsupported dtype {dtype}")
        offsets_ok = isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end
        if not all(isinstance(d, int) and d >= 0 for d in shape) or not offsets_ok:
            raise AverageError(f"corrupt shard {path}: bad shape or offsets for {name}")
        if end - begin != math.prod(shape) * info.itemsize:
            raise AverageError(
                f"corrupt shard {path}: {name} spans {end - begin} bytes, "
                f"its shape {list(shape)} in {dtype} needs {math.prod(shape) * info.itemsize}"
            )
        if data_start + end > file_size:
            raise AverageError(
                f"truncated shard {path}: {file_size} bytes, but tensor {name} ends at byte "
                f"{data_start + end}"
            )
        entries.append(TensorEntry(name, dtype, shape, path, data_start + begin, end - begin))
    entries.sort(key=lambda entry: entry.start)
    return entries


def read_checkpoint(folder: str | os.PathLike[str]) -> Checkpoint:
    """Read a model folder's index (or its single `model.safetensors`) and every shard header."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AverageError(f"model folder not found: {folder}")
    index_path = folder / INDEX_NAME
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise AverageError(f"unreadable index {index_path}: {exc}") from exc
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) and Path(v).name == v for v in weight_map.values()
        ):
            raise AverageError(f"index {index_path}: weight_map must map tensor names to file names")
        shard_names = sorted(set(weight_map.values()))
        weight_files = frozenset([INDEX_NAME, *shard_names])
    elif (folder / SINGLE_NAME).is_file():
        weight_map = None
        shard_names = [SINGLE_NAME]
        weight_files = frozenset(shard_names)
    else:
        raise AverageError(f"{folder} holds neither {INDEX_NAME} nor {SINGLE_NAME}")

    tensors: dict[str, TensorEntry] = {}
    for shard_name in shard_names:
        for entry in read_safetensors_header(folder / shard_name):
            if entry.name in tensors:
                raise AverageError(
                    f"{folder}: tensor {entry.name} appears in both "
                    f"{tensors[entry.name].file.name} and {shard_name}"
                )
            tensors[entry.name] = entry
    if weight_map is not None:
        misplaced = [n for n, f in weight_map.items() if n not in tensors or tensors[n].file.name != f]
        unindexed = [n for n in tensors if n not in weight_map]
        if misplaced:
            raise AverageError(f"index {index_path}: not in their named shard: {_format_names(misplaced)}")
        if unindexed:
            raise AverageError(f"index {index_path}: shards hold unindexed {_format_names(unindexed)}")
    return Checkpoint(folder, tensors, weight_files)


def resolve_weights(
    weights: Sequence[float] | None, num_models: int, allow_unnormalized: bool = False
) -> list[float]:
    """Default 0.3/0.7 for two models; refuse a wrong count, negatives, and a sum other than 1."""
    if num_models < 2:
        raise AverageError(f"averaging needs at least two model folders, got {num_models}")
    if weights is None:
        if num_models != 2:
            raise AverageError(f"--weights is required for {num_models} models (default is for two)")
        weights = DEFAULT_TWO_WEIGHTS
    weights = [float(w) for w in weights]
    if len(weights) != num_models:
        raise AverageError(f"--weights has {len(weights)} values for {num_models} model folders")
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise AverageError(f"--weights must be finite and non-negative, got {weights}")
    total = sum(weights)
    if abs(total - 1.0) > WEIGHT_SUM_TOLERANCE and not allow_unnormalized:
        raise AverageError(
            f"--weights {weights} sum to {total:g}, not 1 (pass --allow-unnormalized to use them)"
        )
    return weights


def check_compatible(checkpoints: Sequence[Checkpoint], contributing: Sequence[Checkpoint] | None = None) -> None:
    """Every input must hold the same tensor names with the same shapes and dtypes (headers
    only), and the `contributing` ones (default: all) the same non-float tensors (data)."""
    reference = checkpoints[0]
    problems = []
    for other in checkpoints[1:]:
        only_ref = [n for n in reference.tensors if n not in other.tensors]
        only_other = [n for n in other.tensors if n not in reference.tensors]
        if only_ref:
            problems.append(f"{other.folder} lacks {_format_names(only_ref)}")
        if only_other:
            problems.append(f"{other.folder} has extra {_format_names(only_other)}")
        common = [n for n in reference.tensors if n in other.tensors]
        shapes = [n for n in common if reference.tensors[n].shape != other.tensors[n].shape]
        dtypes = [n for n in common if reference.tensors[n].dtype != other.tensors[n].dtype]
        if shapes:
            problems.append(f"{other.folder}: shapes differ for {_format_names(shapes)}")
        if dtypes:
            problems.append(f"{other.folder}: dtypes differ for {_format_names(dtypes)}")
    if problems:
        raise AverageError(
            f"inputs cannot be averaged (compared with {reference.folder}):\n  "
            + "\n  ".join(problems)
        )
    contributing = list(contributing if contributing is not None else checkpoints)
    first = contributing[0]
    non_float = [e.name for e in first.tensors.values() if not SAFETENSORS_DTYPES[e.dtype].is_float]
    differing = [
        name
        for name in non_float
        if any(_read_bytes(c.tensors[name]) != _read_bytes(first.tensors[name]) for c in contributing[1:])
    ]
    if differing:
        raise AverageError(
            f"non-float tensors cannot be averaged and differ between inputs: "
            f"{_format_names(differing)}"
        )


def _read_bytes(entry: TensorEntry) -> bytes:
    with open(entry.file, "rb") as handle:
        handle.seek(entry.start)
        return handle.read(entry.nbytes)


def parse_size(size: int | str) -> int:
    """'5GB' -> 5 * 10**9, '1GiB' -> 2**30, '500MB', '64KiB' or a plain byte count."""
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", size, re.IGNORECASE)
        if match is None:
            raise AverageError(f"--max-shard-size {size!r} is not a size like 5GB, 500MB or 2GiB")
        unit = (match.group(2) or "B").upper()
        scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                 "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
        value = int(float(match.group(1)) * scale)
    if value <= 0:
        raise AverageError(f"--max-shard-size must be positive, got {size!r}")
    return value


def plan_shards(entries: Sequence[TensorEntry], max_shard_bytes: int) -> list[list[TensorEntry]]:
    """Group tensors, in order, into shards of at most `max_shard_bytes` (an oversized tensor
    gets its own); inside a shard, wider dtypes go first so every tensor stays aligned."""
    by_name = {entry.name: entry for entry in entries}
    itemsize = {entry.name: SAFETENSORS_DTYPES[entry.dtype].itemsize for entry in entries}
    shards = safetensors_io.plan_shards({entry.name: entry.nbytes for entry in entries}, max_shard_bytes)
    return [[by_name[name] for name in safetensors_io.aligned_order(shard, itemsize)] for shard in shards]


class SafetensorsWriter:
    """Writes one safetensors file whose layout is known in advance: header first, then the
    tensors' bytes streamed in header order, so no tensor is ever held whole in memory.

    The file is created on the first write (or on close, for a shard of empty tensors)."""

    def __init__(self, path: Path, entries: Sequence[TensorEntry]) -> None:
        self._header = safetensors_io.header_bytes({e.name: (e.dtype, e.shape, e.nbytes) for e in entries})
        self.path = path
        self.expected_bytes = sum(entry.nbytes for entry in entries)
        self.written_bytes = 0
        self._file: DirectFile | None = None

    @property
    def file_size(self) -> int:
        """Bytes of the finished file: header and tensors."""
        return len(self._header) + self.expected_bytes

    def _open(self) -> DirectFile:
        if self._file is None:
            # Past the page cache: the disk writes the shard while it is computed, and the
            # final fsync finds nothing left (see DirectFile).
            self._file = DirectFile(self.path, buffer_bytes=OUTPUT_BUFFER_BYTES, buffers=2)
            self._file.write(self._header)
        return self._file

    def write(self, data: memoryview) -> None:
        self._open().write(data)
        self.written_bytes += data.nbytes

    def abort(self) -> None:
        """Close without the completeness check (the folder is being thrown away). Never
        raises: the error being handled must not be replaced by one from the clean-up."""
        if self._file is not None:
            self._file.abort()

    def close(self) -> None:
        self._open().close()
        if self.written_bytes != self.expected_bytes:
            raise RuntimeError(
                f"{self.path}: wrote {self.written_bytes} tensor bytes, expected {self.expected_bytes}"
            )


@dataclass(frozen=True)
class Chunk:
    """`count` elements from element `first` of one tensor, read from every input."""

    sources: list[TensorEntry]
    first: int
    count: int
    writer: SafetensorsWriter

    @property
    def info(self) -> DtypeInfo:
        return SAFETENSORS_DTYPES[self.sources[0].dtype]

    @property
    def nbytes(self) -> int:
        return self.count * self.info.itemsize


class ChunkBuffers:
    """Byte buffers for one chunk in flight (the output's, scratch), grown to the largest
    chunk seen and then reused, so the steady state allocates nothing; and `inputs`, each
    input's bytes of the chunk as views of the mapped input file (no copy)."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self.inputs: list[torch.Tensor] = []
        self.regions: list[tuple[mmap.mmap, int, int]] = []  # (mapping, offset, bytes) of each

    def get(self, role: str, nbytes: int) -> torch.Tensor:
        buffer = self._buffers.get(role)
        if buffer is None or buffer.numel() < nbytes:
            import torch

            buffer = self._buffers[role] = torch.empty(nbytes, dtype=torch.uint8)
        return buffer[:nbytes]


class StreamingAverager:
    """Three-stage pipeline over chunks: a reader thread maps and faults in the next chunk's
    inputs while the calling thread averages the current one and a writer thread writes the
    previous one. Each of the `SLOTS` buffer sets cycles through read -> average -> write.

    Chunks are cache-sized and the arithmetic runs single-threaded: with the two I/O threads
    sharing the CPU, that measured faster than torch's intra-op threads on large arrays."""

    SLOTS = 3  # one chunk being read, one averaged, one written

    def __init__(self, weights: Sequence[float], chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> None:
        self.weights = list(weights)
        self.chunk_elements = chunk_elements
        # Two inputs whose weights sum to 1: w0·a + w1·b == lerp(a, b, w1), which torch
        # computes for 16-bit floats in float32 and rounds once, in one fused pass.
        self._lerp_weight = (
            self.weights[1] / sum(self.weights)
            if len(self.weights) == 2 and abs(sum(self.weights) - 1.0) <= WEIGHT_SUM_TOLERANCE
            else None
        )
        self._slots = [ChunkBuffers() for _ in range(self.SLOTS)]
        self._scratch = ChunkBuffers()
        self._maps: dict[Path, mmap.mmap] = {}
        self._can_populate = True

    def _steps(
        self, shards: Sequence[tuple[SafetensorsWriter, list[list[TensorEntry]]]]
    ) -> Iterator[Chunk | SafetensorsWriter]:
        """Chunks in output order, each shard's writer right after its last chunk (to close)."""
        for writer, tensors in shards:
            for sources in tensors:
                total = sources[0].nbytes // SAFETENSORS_DTYPES[sources[0].dtype].itemsize
                for first in range(0, total, self.chunk_elements):
                    yield Chunk(sources, first, min(self.chunk_elements, total - first), writer)
            yield writer

    def run(self, shards: Sequence[tuple[SafetensorsWriter, list[list[TensorEntry]]]]) -> None:
        """Write every shard: for each writer, the weighted sum of each tensor's sources.

        Only the chunks in flight are held (not one object per chunk of the model), so memory
        stays flat however large the model. torch runs single-threaded meanwhile (restored)."""
        slots = self._slots
        pending: deque[tuple[Chunk, ChunkBuffers, Future[None], int] | SafetensorsWriter] = deque()
        writes: deque[tuple[int, Future[None]]] = deque()
        closes: list[Future[None]] = []
        started = 0
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        with warnings.catch_warnings(), ThreadPoolExecutor(1, "average-read") as reader, ThreadPoolExecutor(
            1, "average-write"
        ) as writer_pool:
            # The inputs are mapped read-only, and nothing writes to them.
            warnings.filterwarnings("ignore", "The given buffer is not writable", UserWarning)

            def finish_oldest() -> None:
                item = pending.popleft()
                if isinstance(item, SafetensorsWriter):
                    closes.append(writer_pool.submit(item.close))
                    return
                chunk, slot, read, index = item
                read.result()
                data = self._average(chunk, slot)
                writes.append((index, writer_pool.submit(chunk.writer.write, memoryview(data.numpy()))))

            try:
                for step in self._steps(shards):
                    if isinstance(step, SafetensorsWriter):
                        pending.append(step)
                        continue
                    while writes and writes[0][0] <= started - len(slots):
                        writes.popleft()[1].result()  # this slot's previous chunk is written
                    slot = slots[started % len(slots)]
                    pending.append((step, slot, reader.submit(self._read, step, slot), started))
                    started += 1
                    while sum(not isinstance(item, SafetensorsWriter) for item in pending) > 1:
                        finish_oldest()  # average chunk n-1 while chunk n is being read
                while pending:
                    finish_oldest()
                for future in [*(future for _, future in writes), *closes]:
                    future.result()
            except BaseException:
                reader.shutdown(cancel_futures=True)
                writer_pool.shutdown(cancel_futures=True)
                for writer, _ in shards:
                    writer.abort()
                raise
            finally:
                torch.set_num_threads(threads)
                for slot in slots:
                    slot.inputs.clear()  # the views die before their mappings
                for mapped in self._maps.values():
                    mapped.close()
                self._maps.clear()

    def _read(self, chunk: Chunk, slot: ChunkBuffers) -> None:
        """Point the slot's inputs at the chunk's bytes in each mapped input file, and fault
        those pages in here, in the reader thread, while the previous chunk is averaged.

        Mapping instead of reading saves copying every input byte out of the page cache (a
        third of the CPU time); each chunk's pages are unmapped again once averaged
        (`_release`), so the resident set stays a few chunks, not the model."""
        import torch

        offset = chunk.first * chunk.info.itemsize
        sources = chunk.sources if chunk.info.is_float else chunk.sources[:1]
        slot.inputs.clear()
        slot.regions.clear()
        for entry in sources:
            mapped = self._map(entry.file)
            start = entry.start + offset
            if start + chunk.nbytes > len(mapped):
                raise AverageError(f"truncated shard {entry.file}: ran out of bytes in {entry.name}")
            slot.inputs.append(torch.frombuffer(mapped, dtype=torch.uint8, count=chunk.nbytes, offset=start))
            slot.regions.append((mapped, start, chunk.nbytes))
            self._populate(entry.file, mapped, start, chunk.nbytes)

    def _map(self, path: Path) -> mmap.mmap:
        mapped = self._maps.get(path)
        if mapped is None:
            fd = os.open(path, os.O_RDONLY)
            try:
                mapped = self._maps[path] = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
            finally:
                os.close(fd)  # the mapping keeps the file
        return mapped

    def _populate(self, path: Path, mapped: mmap.mmap, start: int, nbytes: int) -> None:
        """Fault a byte range in with one call (MADV_POPULATE_READ, Linux >= 5.14), rather
        than one page fault per 64 KB in the arithmetic. A file cut short since its header
        was checked fails here, with an error naming it, instead of a SIGBUS on access."""
        if not self._can_populate:
            return
        first = start - start % mmap.PAGESIZE
        try:
            mapped.madvise(MADV_POPULATE_READ, first, start + nbytes - first)
        except OSError as error:
            if error.errno == errno.EFAULT:
                raise AverageError(f"truncated shard {path}: it shrank while being averaged") from error
            self._can_populate = False  # an older kernel: pages fault in on first access

    @staticmethod
    def _release(slot: ChunkBuffers) -> None:
        """Unmap an averaged chunk's input pages (the page cache keeps them), but the last,
        which the next chunk usually starts on: a page unmapped too early only faults in again."""
        for mapped, start, nbytes in slot.regions:
            first, last = start - start % mmap.PAGESIZE, (start + nbytes) - (start + nbytes) % mmap.PAGESIZE
            if last > first:
                mapped.madvise(mmap.MADV_DONTNEED, first, last - first)

    def _average(self, chunk: Chunk, slot: ChunkBuffers) -> torch.Tensor:
        """Weighted sum of the slot's inputs into its output buffer; returns the bytes."""
        import torch

        info = chunk.info
        if not info.is_float:  # validated identical in every input: pass through
            return slot.inputs[0]
        dtype = info.torch_dtype
        acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        widen = dtype != acc_dtype
        inputs = [values.view(dtype) for values in slot.inputs]
        output_bytes = slot.get("output", chunk.nbytes)
        output = output_bytes.view(dtype)
        if widen and self._lerp_weight is not None and _dtype_name(dtype) in NONFINITE_BITS:
            torch.lerp(inputs[0], inputs[1], self._lerp_weight, out=output)
        elif not widen:
            torch.mul(inputs[0], self.weights[0], out=output)
            for values, weight in zip(inputs[1:], self.weights[1:]):
                output.add_(values, alpha=weight)
        else:
            acc_bytes = chunk.count * acc_dtype.itemsize
            acc = self._scratch.get("acc", acc_bytes).view(acc_dtype)
            widened = self._scratch.get("widened", acc_bytes).view(acc_dtype)
            acc.copy_(inputs[0]).mul_(self.weights[0])
            for values, weight in zip(inputs[1:], self.weights[1:]):
                # Widen into a reused buffer: a mixed-dtype add_ would allocate one per call.
                acc.add_(widened.copy_(values), alpha=weight)
            output.copy_(acc)
        if not self._all_finite(output):
            self._check_finite(chunk, inputs, output)
        self._release(slot)
        return output_bytes

    def _all_finite(self, output: torch.Tensor) -> bool:
        """A cheap screen of one chunk; the exact search runs only when it fails.

        16-bit floats: a value is NaN or inf when its exponent bits are all set, so one mask
        and one max over the raw bits decide (a float32 sum of 16-bit values converts every
        element and costs 4x more). Wider floats: NaN and inf survive a sum (so does a huge
        but finite sum that overflowed, which the exact search then clears)."""
        import torch

        exponent_bits = NONFINITE_BITS.get(_dtype_name(output.dtype))
        if exponent_bits is None:
            return bool(torch.isfinite(output.sum()))
        magnitude = self._scratch.get("magnitude", output.numel() * 2).view(torch.int16)
        torch.bitwise_and(output.view(torch.int16), 0x7FFF, out=magnitude)
        return int(magnitude.max()) < exponent_bits

    @staticmethod
    def _check_finite(chunk: Chunk, inputs: Sequence[torch.Tensor], output: torch.Tensor) -> None:
        """Name the first input whose chunk holds NaN or inf; else refuse an overflowing sum."""
        import torch

        for entry, values in zip(chunk.sources, inputs):
            bad = (~torch.isfinite(values)).nonzero()
            if len(bad):
                where = chunk.first + int(bad[0])
                kind = "NaN" if torch.isnan(values[bad[0]]).item() else "inf"
                raise NonFiniteInputError(
                    f"{entry.file}: tensor {entry.name} holds {kind} (element {where}; "
                    f"{len(bad)} non-finite among elements {chunk.first}..{chunk.first + chunk.count - 1})"
                )
        if not bool(torch.isfinite(output).all()):
            raise AverageError(f"the weighted sum of tensor {chunk.sources[0].name} overflows "
                               f"{chunk.sources[0].dtype} (are the --weights right?)")


def copy_non_weight_files(checkpoint: Checkpoint, destination: Path) -> list[str]:
    """Copy everything but the weights and their index (config, tokenizer, processor, ...)."""
    copied = []
    for item in sorted(checkpoint.folder.iterdir()):
        if item.name in checkpoint.weight_files or WEIGHT_FILE_PATTERN.fullmatch(item.name):
            continue
        if item.is_dir():
            shutil.copytree(item, destination / item.name)
        else:
            shutil.copy2(item, destination / item.name)
        copied.append(item.name)
    return copied


def _check_output_path(output: Path, inputs: Sequence[Path], overwrite: bool) -> None:
    if problem := output_folder_problem(output, inputs, overwrite, "output"):
        raise AverageError(problem)


def average_checkpoints(
    model_dirs: Sequence[str | os.PathLike[str]],
    output_dir: str | os.PathLike[str],
    weights: Sequence[float] | None = None,
    *,
    inherit_from: int = -1,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    allow_unnormalized: bool = False,
    overwrite: bool = False,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> AverageResult:
    """Write Σ weights[i] · model_dirs[i] to `output_dir`, tensor by tensor.

    `inherit_from` indexes `model_dirs`: that input's non-weight files (config, tokenizer,
    processor, generation config, ...) are copied to the output; the tutorial uses the last
    (recipe-2). Raises `AverageError` before writing anything if any check fails.
    """
    folders = [Path(d) for d in model_dirs]
    output = Path(output_dir)
    weights = resolve_weights(weights, len(folders), allow_unnormalized)
    if not -len(folders) <= inherit_from < len(folders):
        raise AverageError(f"inherit_from={inherit_from} is not one of the {len(folders)} inputs")
    if not any(weights):
        raise AverageError(f"--weights {weights} are all zero: the average would be all zeros")
    max_shard_bytes = parse_size(max_shard_size)
    _check_output_path(output, folders, overwrite)
    checkpoints = [read_checkpoint(folder) for folder in folders]
    # Zero-weight inputs: headers checked, tensor data never read.
    contributing = [(c, w) for c, w in zip(checkpoints, weights) if w != 0]
    check_compatible(checkpoints, [c for c, _ in contributing])

    plan = plan_shards(list(checkpoints[0].tensors.values()), max_shard_bytes)
    shard_names = [SHARD_NAME.format(index=i + 1, total=len(plan)) for i in range(len(plan))]
    weight_map = {e.name: name for name, shard in zip(shard_names, plan) for e in shard}
    total_size = sum(e.nbytes for e in checkpoints[0].tensors.values())
    index_text = safetensors_io.index_text(weight_map, total_size)
    shard_sizes = [SafetensorsWriter(Path(name), shard).file_size for name, shard in zip(shard_names, plan)]
    file_sizes = shard_sizes + [len(index_text.encode("utf-8"))] + non_weight_file_sizes(checkpoints[inherit_from])
    if problem := free_space_problem(output, file_sizes):
        raise AverageError(problem)
    free_before = free_bytes(output)
    averager = StreamingAverager([w for _, w in contributing], chunk_elements)
    try:
        with atomic_output_dir(output, overwrite=overwrite) as temp:
            copy_non_weight_files(checkpoints[inherit_from], temp)
            averager.run(
                [
                    (SafetensorsWriter(temp / name, shard), [[c.tensors[e.name] for c, _ in contributing] for e in shard])
                    for name, shard in zip(shard_names, plan)
                ]
            )
            (temp / INDEX_NAME).write_text(index_text, encoding="utf-8")
    except OSError as error:
        if not is_disk_full(error):
            raise
        raise AverageError(
            f"output {output}: the disk filled up while writing ({error.strerror}); nothing was written. "
            f"The average needs {format_bytes(sum(file_sizes))}; {format_bytes(free_before)} were free "
            f"when it started, {format_bytes(free_bytes(output))} are free now"
        ) from error
    return AverageResult(output, shard_names, len(weight_map), total_size)


def non_weight_file_sizes(checkpoint: Checkpoint) -> list[int]:
    """Sizes of the files `copy_non_weight_files` copies."""
    sizes = []
    for item in checkpoint.folder.iterdir():
        if item.name in checkpoint.weight_files or WEIGHT_FILE_PATTERN.fullmatch(item.name):
            continue
        paths = [p for p in item.rglob("*") if p.is_file()] if item.is_dir() else [item]
        sizes += [p.stat().st_size for p in paths]
    return sizes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bunny-average",
        description="Weighted average of model folders, streamed tensor by tensor "
        "(Bunny's final step: 0.3 x recipe-1 + 0.7 x recipe-2, recipe-2's config).",
    )
    parser.add_argument("models", nargs="+", type=Path, help="two or more model folders")
    parser.add_argument("-o", "--output", type=Path, required=True, help="output model folder")
    parser.add_argument(
        "-w", "--weights", type=float, nargs="+",
        help="one weight per model, summing to 1 (default 0.3 0.7 for two models)",
    )
    parser.add_argument(
        "--inherit-from", type=Path,
        help="the input whose config/tokenizer/other non-weight files the output gets "
        "(default: the last)",
    )
    parser.add_argument(
        "--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
        help=f"largest output shard, e.g. 5GB, 2GiB, 500MB (default {DEFAULT_MAX_SHARD_SIZE})",
    )
    parser.add_argument(
        "--allow-unnormalized", action="store_true", help="accept weights that do not sum to 1"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    add_debug_flag(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("bunny-average", lambda: _average_from_args(args), debug=args.debug)


def _average_from_args(args: argparse.Namespace) -> int:
    inherit_from = -1
    if args.inherit_from is not None:
        matches = [i for i, m in enumerate(args.models) if m.resolve() == args.inherit_from.resolve()]
        if not matches:
            raise AverageError(f"--inherit-from {args.inherit_from} is not one of the model folders")
        inherit_from = matches[0]
    started = time.perf_counter()
    result = average_checkpoints(
        args.models,
        args.output,
        args.weights,
        inherit_from=inherit_from,
        max_shard_size=args.max_shard_size,
        allow_unnormalized=args.allow_unnormalized,
        overwrite=args.overwrite,
    )
    print(
        f"wrote {result.output_dir}: {result.num_tensors} tensors, {format_bytes(result.total_size)} "
        f"in {len(result.shard_files)} shard(s), {time.perf_counter() - started:.1f} s"
    )
    return 0


if __name__ == "__main__":
    from bunny.cli import exit_now

    exit_now(main())  # torch's teardown at exit would cost seconds of CPU
