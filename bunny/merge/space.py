"""Disk space for the merge's output: checked before anything is loaded, reported in human units."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from bunny.merge.inputs import MergeError

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_UNITS = ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB"))


def format_size(nbytes: int) -> str:
    """Bytes in the largest unit that keeps the figure >= 1, with three significant digits
    (``2.34 GB``, ``512 MB``, ``18.6 kB``), never ``0.00 GB``."""
    for scale, unit in _UNITS:
        if nbytes >= scale:
            value = nbytes / scale
            return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{nbytes} bytes"


def existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists: where the output's bytes will land."""
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(existing_ancestor(path)).free


def check_free_space(output: Path, needed: int, what: str) -> int:
    """Refuse up front when the output's file system has less than ``needed`` bytes free
    (an overwritten output is freed only after the new one is complete). Returns the free bytes."""
    free = free_bytes(output)
    if free < needed:
        raise MergeError(
            f"--save-model-path {output} needs {format_size(needed)} ({what}) but "
            f"{existing_ancestor(output)} has {format_size(free)} free"
        )
    return free


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS
