"""Prefect artifacts: what the UI shows about each stage.

Keys are `<stage>-<kind>` (lowercase letters, digits and dashes, as Prefect requires):
`<stage>-output` (link to the output folder), `<stage>-summary` (path, size, files, steps,
final loss, seconds), `<stage>-progress` (live, training stages), `<stage>-loss` (training
stages: the loss curve as a picture with its summary numbers, refreshed while the stage runs;
also `<stage>/loss.png`), `<stage>-loss-table` (the loss per step, downsampled, 4 significant
digits), `preflight-report` (markdown) and `pipeline-summary` (every training stage's curve in
one chart, and one row per stage). Charts come from `flows.charts`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import get_run_logger
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import ArtifactUpdate
from prefect.exceptions import MissingContextError

from bunny.fsutil import format_bytes
from bunny.train.callbacks import METRICS_FILE, PROGRESS_FILE
from bunny.train.train import COMPLETE_FILE as TRAINING_COMPLETE_FILE
from flows.charts import Chart, Line, Panel, Report, auto_smoothing, downsample, line_chart, round_significant
from flows.markers import read_json

KEY_PATTERN = re.compile(r"^[a-z0-9-]+$")
MAX_LOSS_ROWS = 300  # rows of a `<stage>-loss-table` artifact
LIVE_CHART_SECONDS = 60.0  # a running stage's loss chart is redrawn at most this often
LR_KEY = "learning_rate"  # and `learning_rate/<group>`, one per optimizer parameter group
LOSS_PICTURE = "loss.png"  # in the stage folder, beside output/ and logs/
PIPELINE_PICTURE = "pipeline-loss.png"  # in the output root, beside the stage folders


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
    row = {**summary, "size": format_bytes(summary["size_bytes"]), "skipped": skipped}
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


def loss_history(output: Path) -> list[dict[str, Any]]:
    """Every logged training step (the latest line per step: a resumed run logs some twice),
    with its loss, learning rate(s) and epoch, in step order."""
    by_step: dict[int, dict[str, Any]] = {}
    for row in read_metrics(output):
        if "loss" in row and "step" in row:
            kept = {key: row[key] for key in row if key == LR_KEY or key.startswith(LR_KEY + "/")}
            by_step[int(row["step"])] = {"step": int(row["step"]), "loss": row["loss"], **kept, "epoch": row.get("epoch")}
    return [by_step[step] for step in sorted(by_step)]


def learning_rate_keys(history: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every `learning_rate/<group>` key the log has, else `learning_rate` when present."""
    keys: dict[str, None] = {}
    for row in history:
        keys.update(dict.fromkeys(k for k in row if k.startswith(LR_KEY + "/")))
    if keys:
        return sorted(keys)
    return [LR_KEY] if any(LR_KEY in row for row in history) else []


def loss_curve(output: Path, max_rows: int = MAX_LOSS_ROWS) -> list[dict[str, Any]]:
    """The loss table: at most `max_rows` steps (evenly spaced, with the first, the last and the
    lowest loss), numbers at 4 significant digits."""
    history = loss_history(output)
    columns = ["step", "loss", *learning_rate_keys(history), "epoch"]
    rows = downsample(history, max_rows, keep_min="loss")
    return [{c: round_significant(row.get(c)) for c in columns} for row in rows]


def training_summary(output: Path, history: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """The numbers a person checks first: first / last / lowest loss, steps, throughput
    (throughput only once the trainer has logged it, i.e. at the end)."""
    metrics = read_metrics(output)
    history = loss_history(output) if history is None else history
    if not history:
        return {}
    lowest = min(history, key=lambda row: row["loss"])
    total = next((row["max_steps"] for row in reversed(metrics) if row.get("max_steps")), None)
    final = next((row for row in reversed(metrics) if "train_runtime" in row), {})
    runtime = final.get("train_runtime")
    tokens_per_second = final.get("train_tokens_per_second")
    if tokens_per_second is None and runtime and "num_input_tokens_seen" in final:
        tokens_per_second = final["num_input_tokens_seen"] / runtime
    summary = {
        "first loss": history[0]["loss"],
        "last loss": history[-1]["loss"],
        "lowest loss": lowest["loss"],
        "lowest at step": lowest["step"],
        "steps": f"{history[-1]['step']:,} / {total:,}" if total else history[-1]["step"],
        "train seconds": runtime,
        "samples/s": final.get("train_samples_per_second"),
        "tokens/s": tokens_per_second,
    }
    return {k: round_significant(v) for k, v in summary.items() if v is not None}


def loss_chart(title: str, history: Sequence[Mapping[str, Any]]) -> Chart:
    """Loss against step (smoothed over the raw points when long), learning rate per parameter
    group in a second, shorter panel."""
    steps = [row["step"] for row in history]
    smoothing = auto_smoothing(len(history))
    label = "loss (smoothed; faint: every logged value)" if smoothing else "loss"
    panels = [Panel([Line(label, steps, [row["loss"] for row in history], smoothing)], "loss")]
    lr_lines = []
    for key in learning_rate_keys(history):
        points = [(row["step"], row[key]) for row in history if isinstance(row.get(key), (int, float))]
        group = key.split("/", 1)[1] if "/" in key else "all parameters"
        lr_lines.append(Line(group, [p[0] for p in points], [p[1] for p in points]))
    if lr_lines:
        panels.append(Panel(lr_lines, "learning rate", height=0.5))
    return line_chart(panels, title=title, x_label="optimizer step")


@dataclass(frozen=True)
class LossReport:
    """The `<stage>-loss` markdown, its description, and where its picture was saved."""

    markdown: str
    description: str
    picture: Path | None


def loss_report(stage: str, output: Path, final: bool) -> LossReport | None:
    """The chart (also saved as `loss.png` in the stage folder) and summary numbers, or None
    before the first logged loss. A chart that fails to draw is logged, never raised: training
    must not fail for its picture."""
    history = loss_history(output)
    if not history:
        return None
    state = "final" if final else f"live, step {history[-1]['step']:,}"
    report = Report().heading(f"{stage}: training loss ({state})")
    picture = None
    try:
        chart = loss_chart(f"{stage}: training loss", history)
        picture = chart.save(output.parent / LOSS_PICTURE)
        report.chart(chart, f"{stage} loss")
    except Exception:  # noqa: BLE001 - observability must not fail a training
        _logger().exception("%s: could not draw the loss chart", stage)
    report.table([training_summary(output, history)])
    where = f"the picture: `{picture}`; " if picture else ""
    report.text(f"_{where}every logged step: the `{artifact_key(stage, 'loss-table')}` artifact at the end of the stage._")
    return LossReport(report.markdown(), f"{stage} training loss ({state})", picture)


def publish_loss_curve(stage: str, output: Path, final: bool = True) -> Path | None:
    """A new version of `<stage>-loss` and, when `final`, the `<stage>-loss-table`.
    Returns the chart's PNG path, if one was drawn."""
    report = loss_report(stage, output, final)
    if report is None:
        return None
    create_markdown_artifact(markdown=report.markdown, key=artifact_key(stage, "loss"), description=report.description)
    if final:
        create_table_artifact(table=loss_curve(output), key=artifact_key(stage, "loss-table"),
                              description=f"{stage} loss per step (at most {MAX_LOSS_ROWS} rows, 4 significant digits)")
    return report.picture


def update_markdown_artifact(artifact_id: UUID, markdown: str, description: str | None = None) -> None:
    """Replace a markdown artifact's content in place (Prefect has this only for progress)."""
    update = ArtifactUpdate(data=markdown, description=description) if description else ArtifactUpdate(data=markdown)
    get_client(sync_client=True).update_artifact(artifact_id=artifact_id, artifact=update)


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


class TrainingProgress:
    """A progress artifact kept in step with the trainer's `progress.json`, and a live
    `<stage>-loss` chart redrawn from `metrics.jsonl` at most every `chart_interval_seconds`.

    The live chart is one artifact version updated in place, so the run graph shows one live
    node per stage (plus the final version `publish_loss_curve` adds at the end), not one node
    per redraw; the UI shows its newest content."""

    def __init__(self, stage: str, output: Path, chart_interval_seconds: float = LIVE_CHART_SECONDS) -> None:
        self.stage = stage
        self.output = output
        self.progress_file = output / PROGRESS_FILE
        self.chart_interval_seconds = chart_interval_seconds
        self.last: tuple[int, int] | None = None
        self.charted_step: int | None = None
        self.charted_at = -math.inf
        self.chart_id: UUID | None = None
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
        if "loss" in state and step != self.charted_step and time.monotonic() - self.charted_at >= self.chart_interval_seconds:
            self.charted_step, self.charted_at = step, time.monotonic()
            self.refresh_chart()

    def refresh_chart(self) -> None:
        report = loss_report(self.stage, self.output, final=False)
        if report is None:
            return
        if self.chart_id is None:
            self.chart_id = create_markdown_artifact(
                markdown=report.markdown, key=artifact_key(self.stage, "loss"), description=report.description)
        else:
            update_markdown_artifact(self.chart_id, report.markdown, report.description)

    def finish(self, steps: int | None) -> None:
        update_progress_artifact(self.artifact_id, progress=100.0, description=f"{self.stage}: done ({steps} steps)")


def publish_preflight(markdown: str) -> None:
    create_markdown_artifact(markdown=markdown, key="preflight-report", description="checks before any GPU time")


def pipeline_loss_chart(rows: Sequence[Mapping[str, Any]]) -> Chart | None:
    """Every training stage's loss (found through its row's `output` folder) in one chart."""
    lines = []
    for row in rows:
        history = loss_history(Path(row["output"])) if row.get("output") else []
        if history:
            lines.append(Line(str(row.get("stage", row["output"])), [r["step"] for r in history],
                              [r["loss"] for r in history], auto_smoothing(len(history))))
    if not lines:
        return None
    smoothed = any(line.smoothing for line in lines)
    return line_chart(Panel(lines, "loss (smoothed)" if smoothed else "loss"),
                      title="training loss per stage", x_label="optimizer step")


def publish_pipeline_summary(rows: Sequence[Mapping[str, Any]]) -> None:
    """`pipeline-summary`: the training stages' curves in one chart (also saved as
    `pipeline-loss.png` beside the stage folders) and a table of every key the rows have."""
    report = Report().heading("Pipeline summary")
    try:
        chart = pipeline_loss_chart(rows)
    except Exception:  # noqa: BLE001 - the stages are done; a chart must not fail the run
        _logger().exception("could not draw the pipeline's loss chart")
        chart = None
    if chart is not None:
        report.chart(chart, "training loss per stage")
        roots = {Path(row["output"]).parent.parent for row in rows if row.get("output")}
        if len(roots) == 1:
            report.text(f"_the picture: `{chart.save(roots.pop() / PIPELINE_PICTURE)}`_")
    table = [{k: (f"`{v}`" if k == "output" and v else round_significant(v)) for k, v in row.items()} for row in rows]
    report.table(table)
    create_markdown_artifact(markdown=report.markdown(), key="pipeline-summary", description="every stage")
