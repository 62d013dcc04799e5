"""Disk space for the merge's output: checked before anything is loaded, reported in human units."""

from __future__ import annotations

from pathlib import Path

from bunny.fsutil import existing_ancestor, format_bytes, free_bytes
from bunny.merge.inputs import MergeError

def check_free_space(output: Path, needed: int, what: str) -> int:
    """Refuse up front when the output's file system has less than ``needed`` bytes free
    (an overwritten output is freed only after the new one is complete). Returns the free bytes."""
    free = free_bytes(output)
    if free < needed:
        raise MergeError(
            f"--save-model-path {output} needs {format_bytes(needed)} ({what}) but "
            f"{existing_ancestor(output)} has {format_bytes(free)} free"
        )
    return free
