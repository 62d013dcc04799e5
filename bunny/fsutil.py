"""Crash-safe writes: a folder or a JSON file appears complete or not at all.

A model folder that is half written looks, to a loader or to a resuming pipeline, just like a
finished one. So every output is built under a temporary name beside its target (same file
system, so the final rename is atomic), flushed to disk, and only then renamed into place.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import math
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

TEMP_MARKER = ".tmp-"
OLD_MARKER = ".old-"


def fsync_path(path: Path) -> None:
    """Flush one file's or one directory's data and metadata to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file and directory under `root` (and `root` itself) to disk."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            file_path = Path(dirpath) / name
            if not file_path.is_symlink():
                fsync_path(file_path)
        fsync_path(Path(dirpath))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def _sibling(target: Path, marker: str) -> Path:
    return target.parent / f".{target.name}{marker}{uuid.uuid4().hex[:12]}"


@contextlib.contextmanager
def atomic_output_dir(target: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder that becomes `target` only if the block succeeds.

    On success the folder's contents are fsynced and it is renamed to `target`; with
    `overwrite`, an existing `target` is first renamed aside and deleted after the swap, so a
    reader sees either the old or the new folder, never a mix. On any exception (including
    KeyboardInterrupt) the temporary folder is removed and `target` is left untouched.
    A process killed outright leaves only a hidden `.<name>.tmp-*` folder behind.
    """
    target = Path(target).absolute()
    if target.exists() and not overwrite:
        raise FileExistsError(f"output {target} already exists (pass overwrite to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = _sibling(target, TEMP_MARKER)
    temp.mkdir()
    try:
        yield temp
        fsync_tree(temp)
        if target.exists() or target.is_symlink():
            if not overwrite:
                raise FileExistsError(f"output {target} appeared while it was being written")
            old = _sibling(target, OLD_MARKER)
            os.rename(target, old)
            try:
                os.rename(temp, target)
            except BaseException:
                os.rename(old, target)
                raise
            fsync_path(target.parent)
            _remove(old)
        else:
            os.rename(temp, target)
        fsync_path(target.parent)
    except BaseException:
        _remove(temp)
        raise


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Write `obj` as indented JSON to `path` via a fsynced temporary file and a rename."""
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def output_folder_problem(output: Path, inputs: Sequence[Path], overwrite: bool, name: str) -> str | None:
    """Why ``output`` may not be written (``name`` labels it in the message), or None: it
    overlaps an input folder, or it exists and ``overwrite`` is off."""
    resolved = output.resolve()
    for folder in inputs:
        source = folder.resolve()
        if resolved == source or source in resolved.parents or resolved in source.parents:
            return f"{name} {output} overlaps input folder {folder}"
    if (output.exists() or output.is_symlink()) and not overwrite:
        return f"{name} {output} already exists (pass --overwrite to replace it)"
    return None


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write `text` (UTF-8) to `path` via a fsynced temporary file and a rename (JSONL, tables)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = _sibling(path, TEMP_MARKER)
    try:
        with open(temp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def format_bytes(size: int) -> str:
    """`size` in human units: '812 B', '3.4 KB', '27.1 MB', '7.60 GB' (powers of 1000)."""
    if size < 1000:
        return f"{size} B"
    for unit in ("KB", "MB", "GB", "TB", "PB"):
        size /= 1000
        if size < 1000 or unit == "PB":
            return f"{size:.2f} {unit}" if unit in ("GB", "TB", "PB") else f"{size:.1f} {unit}"
    raise AssertionError("unreachable")


def existing_ancestor(path: Path) -> Path:
    """`path` itself or its nearest existing parent: where a new output's space comes from."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def disk_bytes(file_sizes: Sequence[int], block_size: int) -> int:
    """Space that files of `file_sizes` bytes take on a file system of `block_size` blocks."""
    return sum(math.ceil(size / block_size) * block_size for size in file_sizes) + block_size  # + the folder


def free_space_problem(output: Path, file_sizes: Sequence[int], name: str = "output") -> str | None:
    """Why the files about to be written under `output` would not fit, or None.

    Counts every file (headers, configs, tokenizer...) rounded up to the file system's block;
    an output being overwritten is freed only after the new one is complete, so its space
    does not count as free."""
    where = existing_ancestor(output)
    usage = os.statvfs(where)
    needed = disk_bytes(file_sizes, usage.f_frsize or 4096)
    free = usage.f_bavail * usage.f_frsize
    if free < needed:
        return (f"{name} {output} needs {format_bytes(needed)} ({len(file_sizes)} files) "
                f"but {where} has {format_bytes(free)} free")
    return None


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` (or what it was raised from) is a full disk or an exhausted quota."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False


def free_bytes(path: Path) -> int:
    """Bytes free to an unprivileged writer on `path`'s file system."""
    usage = os.statvfs(existing_ancestor(path))
    return usage.f_bavail * usage.f_frsize


class Writeback:
    """Sends a file that is being written sequentially to disk while it is written, instead
    of all at once by the final fsync (which then finds little left to do).

    Every `window` bytes, the window just written is queued for writeback and the one before
    it is waited for, so at most two windows of the file are dirty at a time and the disk
    works while the writer computes. Linux's `sync_file_range`; elsewhere this does nothing
    and the final fsync does all the work, as before. Durability still comes from fsync:
    sync_file_range writes data, not the metadata that makes it reachable."""

    WAIT_BEFORE, WRITE, WAIT_AFTER = 1, 2, 4  # SYNC_FILE_RANGE_* from <linux/fs.h>

    def __init__(self, window: int = 64 * 2**20) -> None:
        self.window = window
        self._queued = 0  # bytes from the start of the file handed to the disk so far
        self._waited = 0  # bytes known to be on the disk (up to the previous window)

    def wrote(self, fd: int, end: int) -> None:
        """The file is written up to byte `end`: queue what is due, wait for the older part."""
        if end - self._queued < self.window:
            return
        sync_file_range = _sync_file_range()
        if sync_file_range is None:
            return
        try:
            sync_file_range(fd, self._queued, end - self._queued, self.WRITE)
            if self._queued > self._waited:
                flags = self.WAIT_BEFORE | self.WRITE | self.WAIT_AFTER
                sync_file_range(fd, self._waited, self._queued - self._waited, flags)
        except OSError as error:
            if error.errno not in (errno.EINVAL, errno.ENOSYS, errno.ESPIPE, errno.EOPNOTSUPP):
                raise  # EIO, ENOSPC...: the write failed
            self.window = math.inf  # a file system without it: leave it all to fsync
        self._waited, self._queued = self._queued, end


@functools.cache
def _sync_file_range():
    """libc's sync_file_range as a Python callable raising OSError, or None where absent."""
    if not hasattr(os, "posix_fadvise"):  # not a Linux-like libc
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    native = getattr(libc, "sync_file_range", None)
    if native is None:
        return None
    native.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]

    def sync_file_range(fd: int, offset: int, length: int, flags: int) -> None:
        if native(fd, offset, length, flags) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), "sync_file_range")

    return sync_file_range


class DirectFile:
    """A new file written front to back without going through the page cache (``O_DIRECT``).

    Writing through the page cache costs a kernel copy and page bookkeeping per byte (4 s of
    CPU for a 2.6 GB merge on this project's 2-core machine), then an fsync that finds it
    all still dirty. Here the bytes are copied once into page-aligned buffers, and a thread
    of its own hands each full buffer to the disk (DMA, no copy, about 0.1 s of CPU for the
    same file) while the caller fills the next one: the disk and the caller's arithmetic
    overlap. The last buffer is padded to the alignment and the file cut back to its size.
    Where the file system refuses ``O_DIRECT`` (tmpfs on older kernels, some network file
    systems) the same writes go through the page cache, sent to disk window by window
    (``Writeback``). Durability still comes from fsync: the size and the block map are metadata.

    ``write`` and ``close`` raise the first error of the disk (ENOSPC, EIO...); ``abort``
    never raises."""

    ALIGNMENT = 4096  # offsets, lengths and buffer addresses of O_DIRECT writes

    def __init__(self, path: str | os.PathLike[str], buffer_bytes: int = 32 * 2**20, buffers: int = 2) -> None:
        import mmap
        import queue
        import threading

        self.path = Path(path)
        self.size = 0  # bytes written so far
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        direct = getattr(os, "O_DIRECT", 0)
        try:
            self._fd = os.open(self.path, flags | direct, 0o666)
        except OSError as error:
            if not direct or error.errno != errno.EINVAL:
                raise
            self._fd, direct = os.open(self.path, flags, 0o666), 0
        self.direct = bool(direct)
        capacity = -(-buffer_bytes // self.ALIGNMENT) * self.ALIGNMENT
        self._free: queue.Queue = queue.Queue()
        for _ in range(max(1, buffers)):
            self._free.put(mmap.mmap(-1, capacity))  # page-aligned, as O_DIRECT wants
        self._full: queue.Queue = queue.Queue()
        self._buffer, self._fill, self._start = self._free.get(), 0, 0
        self._error: BaseException | None = None
        self._closed = False
        self._writeback = Writeback()  # for the page-cache fallback
        self._thread = threading.Thread(target=self._drain, name=f"direct-write {self.path.name}", daemon=True)
        self._thread.start()

    def write(self, data) -> None:
        """Append ``data`` (any bytes-like object)."""
        view = memoryview(data).cast("B")
        while view.nbytes:
            self._raise_error()
            taken = min(view.nbytes, len(self._buffer) - self._fill)
            self._buffer[self._fill:self._fill + taken] = view[:taken]
            self._fill += taken
            self.size += taken
            view = view[taken:]
            if self._fill == len(self._buffer):
                self._hand_over(self._fill)

    def close(self) -> None:
        """Write what is left, wait for the disk to take it, close."""
        if self._closed:
            return
        try:
            length = self._fill
            if self.direct and length % self.ALIGNMENT:
                padded = length + (-length % self.ALIGNMENT)
                self._buffer[length:padded] = bytes(padded - length)
                length = padded
            if length:
                self._hand_over(length, last=True)
            self._stop()
            self._raise_error()
            if self._start != self.size:
                os.ftruncate(self._fd, self.size)  # the padding of the last block
        finally:
            self._release()

    def abort(self) -> None:
        """Stop and close, whatever state the disk is in (the file is being thrown away)."""
        if not self._closed:
            self._stop()
            self._release()

    def _hand_over(self, length: int, last: bool = False) -> None:
        self._full.put((self._buffer, self._start, length))
        self._start += length
        self._buffer, self._fill = (None, 0) if last else (self._free.get(), 0)

    def _stop(self) -> None:
        self._full.put(None)
        self._thread.join()

    def _release(self) -> None:
        """Close the file and free the buffers (the writer thread has stopped)."""
        self._closed = True
        self._buffer = None
        while not self._free.empty():
            self._free.get()  # dropped, not closed: an error's traceback may still view one
        with contextlib.suppress(OSError):
            os.close(self._fd)

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _drain(self) -> None:
        """The writer thread: buffers to disk in order; after an error, only hands them back."""
        while (item := self._full.get()) is not None:
            buffer, offset, length = item
            if self._error is None:
                try:
                    self._pwrite_all(memoryview(buffer)[:length], offset)
                except BaseException as error:  # noqa: BLE001 (re-raised in the caller's thread)
                    self._error = error
            self._free.put(buffer)

    def _pwrite_all(self, view: memoryview, offset: int) -> None:
        while view.nbytes:
            try:
                written = os.pwrite(self._fd, view, offset)
            except OSError as error:
                if not (self.direct and error.errno == errno.EINVAL):
                    raise
                self._buffered()  # the file system took the open, not the write
                continue
            if written == 0:
                raise OSError(errno.EIO, f"wrote 0 bytes at offset {offset}", str(self.path))
            view, offset = view[written:], offset + written
            if view.nbytes and self.direct and written % self.ALIGNMENT:
                self._buffered()  # a short write left the rest unaligned
        if not self.direct:
            self._writeback.wrote(self._fd, offset)

    @staticmethod
    def direct_flag(fd: int) -> bool:
        """Whether ``fd`` bypasses the page cache."""
        import fcntl

        return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0))

    def _buffered(self) -> None:
        import fcntl

        fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self.direct = False
