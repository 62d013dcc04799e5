"""Accuracy per kind of tiny held-out question, next to what a uniform guess scores (chance).

Works on per-record results as `bunny.evaluate` writes them (`records.jsonl`: each record's
first `question` and whether its greedy answer was `correct`), so the demo and
`benchmarks/learning_check.py` print the same table.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from bunny.tiny.data import QUESTION_KINDS, question_kind

TARGET_KINDS = ("colour", "shape")  # the questions only the image answers, pooled as "colour+shape"
POOLED = "colour+shape"


def _kinds(question: str) -> list[tuple[str, int]]:
    found = question_kind(question)
    if found is None:
        return []
    return [found, (POOLED, found[1])] if found[0] in TARGET_KINDS else [found]


def accuracy_by_kind(records: Iterable[Mapping[str, Any]]) -> dict[str, list[bool]]:
    """Question kind -> correctness of each scored first-turn answer of that kind."""
    table: dict[str, list[bool]] = {}
    for record in records:
        if record.get("correct") is None:
            continue
        for kind, _ in _kinds(record["question"]):
            table.setdefault(kind, []).append(bool(record["correct"]))
    return table


def chance_by_kind(records: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Question kind -> a uniform guess's expected accuracy over these records' questions."""
    odds: dict[str, list[float]] = {}
    for record in records:
        for kind, choices in _kinds(record["question"]):
            odds.setdefault(kind, []).append(1 / choices)
    return {kind: sum(values) / len(values) for kind, values in odds.items()}


def kind_table(models: Mapping[str, list[Mapping[str, Any]]]) -> str:
    """A markdown table: one row per model, one column per question kind (with its count),
    and a first row `chance`."""
    if not models:
        return ""
    first = next(iter(models.values()))
    odds = chance_by_kind(first)
    order = [kind for kind, _, _ in QUESTION_KINDS] + [POOLED]
    kinds = [kind for kind in order if kind in odds]
    counts = accuracy_by_kind(first)
    lines = ["| model | " + " | ".join(f"{kind} ({len(counts.get(kind, []))})" for kind in kinds) + " |",
             "| --- |" + " ---: |" * len(kinds),
             "| chance | " + " | ".join(f"{100 * odds[kind]:.1f}%" for kind in kinds) + " |"]
    for model, records in models.items():
        accuracy = accuracy_by_kind(records)
        cells = [f"{100 * sum(v) / len(v):.1f}%" if (v := accuracy.get(kind)) else "-" for kind in kinds]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of one `records.jsonl` file."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def stage_records(set_output: Path, stages: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
    """Stage -> its records under one eval set's output folder of the evaluate stage, where
    each model's results are in a folder named after its stage (`pretrain/output/records.jsonl`)."""
    found = {}
    for stage in stages:
        files = sorted((set_output / stage).glob("**/records.jsonl"))
        if files:
            found[stage] = read_records(files[0])
    return found
