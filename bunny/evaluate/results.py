"""Results on disk: per-record JSONL and summary JSON per model, one comparison table.

Layout under an output folder (every file written atomically, so a reader or a resuming
pipeline never sees half of one)::

    <label>/records.jsonl    one RecordResult per line, in the held-out file's order
    <label>/summary.json     the EvalSummary
    summary.json             every model's summary, in the order given
    summary.md               the comparison table
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from bunny.evaluate.evaluator import EvalResult, EvalSummary
from bunny.fsutil import write_json_atomic, write_text_atomic
from bunny.generate.answers import dumps_jsonl

RECORDS_FILE = "records.jsonl"
SUMMARY_FILE = "summary.json"
TABLE_FILE = "summary.md"


def model_labels(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """Short distinct names: the fewest trailing path parts that tell the models apart
    (``recipe-1/output`` and ``average/output``, not ``output`` twice)."""
    parts = [Path(path).resolve().parts for path in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{label}#{i}" for i, label in enumerate("/".join(p) for p in parts)]


def _cell(value: float | None, percent: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.1f}%" if percent else f"{value:.4f}"


def summary_table(summaries: Sequence[EvalSummary]) -> str:
    """A Markdown table: one row per model."""
    lines = ["| model | answer loss | accuracy | empty answers | records | tokens |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for s in summaries:
        lines.append(f"| {s.model} | {_cell(s.answer_loss)} | {_cell(s.accuracy, True)} | "
                     f"{_cell(s.empty_share, True)} | {s.records} | {s.tokens} |")
    return "\n".join(lines) + "\n"


def write_model_results(result: EvalResult, folder: str | os.PathLike[str]) -> Path:
    """``records.jsonl`` and ``summary.json`` of one model in ``folder``."""
    folder = Path(folder)
    write_text_atomic(folder / RECORDS_FILE, dumps_jsonl([asdict(r) for r in result.records]))
    write_json_atomic(folder / SUMMARY_FILE, asdict(result.summary))
    return folder


def write_summary(results: Sequence[EvalResult], output: str | os.PathLike[str]) -> Path:
    """The combined ``summary.json`` and ``summary.md`` of ``results`` in ``output``."""
    output = Path(output)
    write_json_atomic(output / SUMMARY_FILE, [asdict(r.summary) for r in results])
    write_text_atomic(output / TABLE_FILE, summary_table([r.summary for r in results]))
    return output


def write_results(results: Sequence[EvalResult], output: str | os.PathLike[str], labels: Sequence[str]) -> Path:
    """Every model's results under ``output/<label>/``, then the combined summary and table."""
    for result, label in zip(results, labels, strict=True):
        write_model_results(result, Path(output) / label)
    return write_summary(results, output)
