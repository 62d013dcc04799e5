"""What the evaluate stage and the weight search publish: results tables, charts, artifacts.

The stages themselves run `python -m bunny.evaluate` / `python -m bunny.evaluate.search_weights`
(see `flows.stages.EvaluateJob` / `SearchAverageJob`); this module turns what those commands
wrote into readable results:

- evaluate: `output/results.json` and `output/results.md` (one row per eval set and model,
  models named by their stage), the `evaluate-results` table artifact, and the
  `evaluate-report` markdown artifact: answer loss (and accuracy) as bar charts, also saved as
  `evaluate/answer-loss.png` and `evaluate/accuracy.png`, above the table;
- weight search: the `average-weight-search` markdown artifact: validation answer loss against
  the first model's weight (grid) or per candidate (greedy soup), also `average/weight-search.png`,
  and the curve as a table with the chosen weights marked.

A chart that fails to draw is logged, never raised: the numbers are already on disk.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from bunny.fsutil import write_json_atomic, write_text_atomic
from flows.artifacts import _logger, artifact_key
from flows.charts import Chart, Line, Panel, Report, bar_chart, line_chart, markdown_table, round_significant
from flows.stages import EvaluateJob, SearchAverageJob

RESULTS_FILE = "results.json"  # in the evaluate stage's output folder
RESULTS_TABLE = "results.md"
SET_SUMMARY_FILE = "summary.json"  # what bunny.evaluate writes in each set's folder
LOSS_PICTURE = "answer-loss.png"  # in the evaluate stage's folder
ACCURACY_PICTURE = "accuracy.png"
SEARCH_PICTURE = "weight-search.png"  # in the average stage's folder
COLUMNS = ("eval set", "model", "answer loss", "accuracy", "empty answers", "records", "tokens")


def evaluation_rows(job: EvaluateJob) -> list[dict[str, Any]]:
    """One row per eval set and model, from each set's `summary.json` (models in the order
    `bunny.evaluate` was given them: the job's upstream stages)."""
    rows = []
    for eval_set in job.sets:
        summaries = json.loads((job.set_output(eval_set) / SET_SUMMARY_FILE).read_text(encoding="utf-8"))
        for stage, summary in zip(job.upstream, summaries, strict=True):
            rows.append({
                "eval set": eval_set.name,
                "model": stage,
                "answer loss": summary["answer_loss"],
                "accuracy": summary["accuracy"],
                "empty answers": summary["empty_share"],
                "records": summary["records"],
                "tokens": summary["tokens"],
            })
    return rows


def results_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The comparison as markdown: losses to 4 decimals (as `bunny.evaluate` prints them),
    shares in percent."""

    def shown(row: Mapping[str, Any]) -> dict[str, Any]:
        cells = {k: round_significant(v) for k, v in row.items()}
        if isinstance(row.get("answer loss"), (int, float)):
            cells["answer loss"] = f"{row['answer loss']:.4f}"
        for share in ("accuracy", "empty answers"):
            if isinstance(row.get(share), (int, float)):
                cells[share] = f"{100 * row[share]:.1f}%"
        return cells

    return markdown_table([shown(row) for row in rows], COLUMNS) + "\n"


def write_results(job: EvaluateJob) -> list[dict[str, Any]]:
    """`results.json` and `results.md` in the stage's output; returns the rows."""
    rows = evaluation_rows(job)
    write_json_atomic(job.dir.output / RESULTS_FILE, rows)
    write_text_atomic(job.dir.output / RESULTS_TABLE, results_table(rows))
    return rows


def read_results(output: Path) -> list[dict[str, Any]]:
    """The rows a finished evaluate stage wrote (empty when there are none)."""
    try:
        rows = json.loads((output / RESULTS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return rows if isinstance(rows, list) else []


def _bars(rows: Sequence[Mapping[str, Any]], metric: str) -> dict[str, float]:
    several = len({row["eval set"] for row in rows}) > 1
    return {(f"{row['model']} ({row['eval set']})" if several else row["model"]): row[metric]
            for row in rows if isinstance(row.get(metric), (int, float))}


def evaluation_charts(rows: Sequence[Mapping[str, Any]]) -> list[tuple[Chart, str]]:
    """Bar charts of answer loss and (when measured) accuracy, each with its file name."""
    charts = [(bar_chart(_bars(rows, "answer loss"), title="held-out answer loss (lower is better)",
                         value_label="mean NLL per answer token (nats)"), LOSS_PICTURE)]
    accuracy = {label: 100 * value for label, value in _bars(rows, "accuracy").items()}
    if accuracy:
        charts.append((bar_chart(accuracy, title="held-out answer accuracy (higher is better)",
                                 value_label="greedy answers matching the reference (%)"), ACCURACY_PICTURE))
    return charts


def publish_evaluation(job: EvaluateJob, rows: Sequence[Mapping[str, Any]]) -> list[Path]:
    """`evaluate-results` (table) and `evaluate-report` (charts + table); returns the PNGs saved."""
    create_table_artifact(table=[{k: round_significant(v) for k, v in row.items()} for row in rows],
                          key=artifact_key(job.stage, "results"),
                          description="every model on every eval set: answer loss, accuracy, empty answers")
    report = Report().heading("Evaluation: every model on held-out data")
    pictures = []
    try:
        for chart, name in evaluation_charts(rows):
            pictures.append(chart.save(job.stage_dir / name))
            report.chart(chart)
    except Exception:  # noqa: BLE001 - the results are written; a picture must not fail the stage
        _logger().exception("%s: could not draw the evaluation charts", job.stage)
    report.text(results_table(rows))
    where = ", ".join(f"`{p}`" for p in pictures)
    report.text(f"_per-record answers: `{job.dir.output}/<eval set>/`" + (f"; the pictures: {where}_" if where else "_"))
    create_markdown_artifact(markdown=report.markdown(), key=artifact_key(job.stage, "report"),
                             description="evaluation: answer loss and accuracy per model")
    return pictures


def _weights(weights: Sequence[float]) -> str:
    return " / ".join(f"{w:.3g}" for w in weights)


def search_rows(job: SearchAverageJob, result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The curve as table rows: each model's weight, the validation loss, whether chosen."""
    chosen = [float(w) for w in result["weights"]]
    return [
        {**{f"{name} weight": w for name, w in zip(job.names, candidate["weights"], strict=True)},
         "validation answer loss": round_significant(candidate["loss"]),
         "chosen": [float(w) for w in candidate["weights"]] == chosen}
        for candidate in result["curve"]
    ]


def search_chart(job: SearchAverageJob, result: Mapping[str, Any]) -> Chart:
    """Grid: loss against the first model's weight; greedy soup: one bar per candidate."""
    curve = result["curve"]
    if result["method"] == "grid":
        points = sorted((c["weights"][0], c["loss"]) for c in curve)
        return line_chart(
            Panel([Line("validation answer loss", [p[0] for p in points], [p[1] for p in points]),
                   Line("chosen", [result["weights"][0]], [result["loss"]])], "validation answer loss"),
            title=f"averaging weight search: chosen {_weights(result['weights'])}",
            x_label=f"weight of {job.names[0]} (the rest: {job.names[1]})",
        )
    bars = {_weights(c["weights"]): c["loss"] for c in curve}
    return bar_chart(bars, title=f"greedy soup: chosen {_weights(result['weights'])}",
                     value_label="validation answer loss", highlight=_weights(result["weights"]))


def publish_weight_search(job: SearchAverageJob) -> dict[str, Any]:
    """`<stage>-weight-search`: the curve's chart (also `weight-search.png`) and table."""
    result = json.loads(job.curve_file.read_text(encoding="utf-8"))
    report = Report().heading(f"Averaging weights chosen on {job.validation.name} ({result['method']})")
    try:
        chart = search_chart(job, result)
        report.chart(chart).text(f"_the picture: `{chart.save(job.stage_dir / SEARCH_PICTURE)}`_")
    except Exception:  # noqa: BLE001 - the average is written; a picture must not fail the stage
        _logger().exception("%s: could not draw the weight search chart", job.stage)
    report.text(f"chosen: **{_weights(result['weights'])}** ({', '.join(job.names)}), validation answer loss "
                f"{result['loss']:.4f}; data `{job.validation.data_path}`")
    report.table(search_rows(job, result))
    create_markdown_artifact(markdown=report.markdown(), key=artifact_key(job.stage, "weight-search"),
                             description=f"averaging weights chosen on {job.validation.name}")
    return result
