"""Stage folders and their completion markers: what lets a re-run skip finished work.

Every stage owns `<output_root>/<stage>/`: `output/` (what it produces), `logs/` (one file
per attempt), `stage-started.json` and, written last and atomically once `output/` is
complete, `stage-complete.json`.

A stage is complete when its complete-marker records the stage's current key: a hash of the
settings that shape its output (training flags, merge and average settings) and of the
fingerprints (file names, sizes, modification times: stat only, contents are never read) of
the outputs it reads. A rewrite of an input that keeps its size and restores its mtime is not
seen; a `touch` is. Neither the
task's source code nor the run id enters the key, so a new run with the same config skips the
stage; a changed setting, or an upstream stage that was re-run, makes it stale. The started
marker keeps a crashed or failed attempt's checkpoints usable by the next attempt only when
the key is the same; otherwise the output folder is emptied before training starts again.

`force` re-runs a stage even though it is complete: the first attempt in the forcing flow run
empties its output; later attempts of the same flow run (task or flow-run retries) resume and
accept a completion from that flow run. Its dependents then re-run too, because the output
they read changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bunny.fsutil import write_json_atomic

COMPLETE_MARKER = "stage-complete.json"
STARTED_MARKER = "stage-started.json"


@dataclass(frozen=True)
class StageDir:
    """The folder of one stage and the fixed names inside it."""

    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def output(self) -> Path:
        return self.path / "output"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    @property
    def complete_marker(self) -> Path:
        return self.path / COMPLETE_MARKER

    @property
    def started_marker(self) -> Path:
        return self.path / STARTED_MARKER

    def next_log(self) -> Path:
        """`logs/attempt-N.log` with N one past the attempts already logged."""
        self.logs.mkdir(parents=True, exist_ok=True)
        attempt = 1 + sum(1 for p in self.logs.glob("attempt-*.log"))
        return self.logs / f"attempt-{attempt}.log"


def folder_fingerprint(path: Path) -> str:
    """Hash of every file's relative path, size and mtime under `path` (stat only, no reads)."""
    digest = hashlib.sha256()
    if path.is_file():
        stat = path.stat()
        digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        return digest.hexdigest()
    if not path.is_dir():
        raise FileNotFoundError(f"stage input {path} does not exist")
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in sorted(filenames):
            file = Path(dirpath) / name
            stat = file.stat()
            relative = file.relative_to(path).as_posix()
            digest.update(f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def stage_key(stage: str, settings: Mapping[str, Any], inputs: Mapping[str, Path]) -> str:
    """The identity of what `stage` will produce from `settings` and its input folders."""
    payload = {
        "stage": stage,
        "settings": settings,
        "inputs": {name: folder_fingerprint(Path(path)) for name, path in sorted(inputs.items())},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def completion(stage_dir: StageDir, key: str, forced_in_run: str | None = None) -> dict[str, Any] | None:
    """The complete-marker if it records `key` (and, when forced, this flow run), else None."""
    marker = read_json(stage_dir.complete_marker)
    if marker is None or marker.get("key") != key or not stage_dir.output.exists():
        return None
    if forced_in_run is not None and marker.get("flow_run_id") != forced_in_run:
        return None
    return marker


def begin_attempt(stage_dir: StageDir, key: str, flow_run_id: str, force: bool) -> bool:
    """Prepare the folder for an attempt; returns True when earlier checkpoints are kept.

    Kept only if the previous attempt had the same key and, when forced, ran in this flow run.
    Otherwise the stale complete-marker goes first, then the output, so a crash in between
    never leaves a marker pointing at a half-deleted folder.
    """
    started = read_json(stage_dir.started_marker) or {}
    keep = started.get("key") == key and (not force or started.get("flow_run_id") == flow_run_id)
    if not keep:
        stage_dir.complete_marker.unlink(missing_ok=True)
        shutil.rmtree(stage_dir.output, ignore_errors=True)
    attempts = int(started.get("attempts", 0)) + 1 if keep else 1
    write_json_atomic(
        stage_dir.started_marker,
        {"key": key, "flow_run_id": flow_run_id, "attempts": attempts, "started_at": time.time()},
    )
    return keep


def mark_complete(stage_dir: StageDir, key: str, flow_run_id: str, summary: Mapping[str, Any]) -> None:
    """Write the complete-marker: the last write of a stage, after its output is whole.
    It keeps the started-marker's count of the attempts that built this output."""
    started = read_json(stage_dir.started_marker) or {}
    write_json_atomic(
        stage_dir.complete_marker,
        {
            "stage": stage_dir.name,
            "key": key,
            "flow_run_id": flow_run_id,
            "attempts": int(started.get("attempts", 1)),
            "completed_at": time.time(),
            "output": str(stage_dir.output),
            "summary": dict(summary),
        },
    )
