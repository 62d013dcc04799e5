"""Prefect artifacts: what the UI shows about each stage.

Keys are `<stage>-<kind>` (lowercase letters, digits and dashes, as Prefect requires):
`<stage>-output` (link to the output folder), `<stage>-summary` (path, size, files, steps,
final loss, seconds), `<stage>-progress` (live, training stages), `<stage>-loss` (loss curve
table, training stages), `preflight-report` (markdown) and `pipeline-summary` (one row per
stage).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from bunny.train.callbacks import METRICS_FILE, PROGRESS_FILE
from bunny.train.train import COMPLETE_FILE as TRAINING_COMPLETE_FILE
from flows.markers import read_json

KEY_PATTERN = re.compile(r"^[a-z0-9-]+$")
MAX_LOSS_ROWS = 500


def artifact_key(stage: str, kind: str) -> str:
    key = f"{stage}-{kind}".lower()
    if not KEY_PATTERN.match(key):
        raise ValueError(f"{key!r} is not a valid artifact key (lowercase letters, digits, dashes)")
    return key


def folder_stats(path: Path) -> tuple[int, int]:
    """(bytes, files) under `path`."""
    size = files = 0
    for dirpath, _dirnames, filenames in os.walk(path):
        for name in filenames:
            size += (Path(dirpath) / name).stat().st_size
            files += 1
    return size, files


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{size} B"


def output_summary(output: Path, seconds: float) -> dict[str, Any]:
    """What the summary table and the completion marker record about a finished output."""
    size, files = folder_stats(output)
    done = read_json(output / TRAINING_COMPLETE_FILE) or {}
    return {
        "path": str(output),
        "size_bytes": size,
        "files": files,
        "steps": done.get("global_step"),
        "final_loss": done.get("final_loss"),
        "seconds": round(seconds, 1),
    }


def publish_output(stage: str, summary: Mapping[str, Any], skipped: bool) -> None:
    """Link + one-row table for a stage's output."""
    state = "complete from an earlier run" if skipped else "written by this run"
    create_link_artifact(
        link=Path(summary["path"]).as_uri(),
        link_text=summary["path"],
        key=artifact_key(stage, "output"),
        description=f"{stage} output ({state})",
    )
    row = {**summary, "size": human_size(summary["size_bytes"]), "skipped": skipped}
    create_table_artifact(table=[row], key=artifact_key(stage, "summary"), description=f"{stage}: {state}")


def read_metrics(output: Path) -> list[dict[str, Any]]:
    """The trainer's log lines (`metrics.jsonl`), skipping any torn last line."""
    rows = []
    try:
        lines = (output / METRICS_FILE).read_text(encoding="utf-8").splitlines()
    except OSError:
        return rows
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def loss_curve(output: Path) -> list[dict[str, Any]]:
    """(step, loss, learning rate, epoch) rows, the latest entry per step, at most MAX_LOSS_ROWS."""
    by_step: dict[int, dict[str, Any]] = {}
    for row in read_metrics(output):
        if "loss" in row and "step" in row:
            by_step[int(row["step"])] = {
                "step": int(row["step"]),
                "loss": row["loss"],
                "learning_rate": row.get("learning_rate"),
                "epoch": row.get("epoch"),
            }
    rows = [by_step[step] for step in sorted(by_step)]
    if len(rows) > MAX_LOSS_ROWS:
        stride = -(-len(rows) // MAX_LOSS_ROWS)
        rows = rows[::stride] + ([rows[-1]] if (len(rows) - 1) % stride else [])
    return rows


def publish_loss_curve(stage: str, output: Path) -> None:
    rows = loss_curve(output)
    if rows:
        create_table_artifact(table=rows, key=artifact_key(stage, "loss"), description=f"{stage} training loss")


class TrainingProgress:
    """A progress artifact kept in step with the trainer's `progress.json`."""

    def __init__(self, stage: str, output: Path) -> None:
        self.stage = stage
        self.progress_file = output / PROGRESS_FILE
        self.last: tuple[int, int] | None = None
        self.artifact_id: UUID = create_progress_artifact(
            progress=0.0, key=artifact_key(stage, "progress"), description=f"{stage}: starting"
        )

    def update(self) -> None:
        state = read_json(self.progress_file)
        if not state or not state.get("max_steps"):
            return
        step, total = int(state.get("step", 0)), int(state["max_steps"])
        if (step, total) == self.last:
            return
        self.last = (step, total)
        loss = state.get("loss")
        shown = f", loss {loss:.4g}" if isinstance(loss, (int, float)) else ""
        description = f"{self.stage}: step {step} / {total}{shown}"
        update_progress_artifact(self.artifact_id, progress=min(100.0, 100.0 * step / total), description=description)

    def finish(self, steps: int | None) -> None:
        update_progress_artifact(self.artifact_id, progress=100.0, description=f"{self.stage}: done ({steps} steps)")


def publish_preflight(markdown: str) -> None:
    create_markdown_artifact(markdown=markdown, key="preflight-report", description="checks before any GPU time")


def publish_pipeline_summary(rows: Sequence[Mapping[str, Any]]) -> None:
    create_table_artifact(table=[dict(r) for r in rows], key="pipeline-summary", description="every stage")
