"""Loading a Bunny/LLaVA data file: one JSON list of records, parsed once, never preprocessed.

A record is ``{"id": ..., "image": "relative/path.jpg" (optional), "conversations": [...]}``.
Tokenization and image decoding happen per item in `SupervisedDataset`, so a 2M-record file
costs one `json.load` and the memory of its Python objects, nothing more.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bunny.cli import UserError

Record = dict[str, Any]
_JSON_KINDS = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}


class DataFileError(UserError, ValueError):
    """`--data_path` is not a JSON list of records (a user error: the message names the file)."""


class DataFileNotFoundError(DataFileError, FileNotFoundError):
    """`--data_path` names no file."""


def load_records(data_path: str | Path) -> list[Record]:
    """Parse `data_path` (`--data_path`), a JSON list of records, as is."""
    path = Path(data_path)
    if not path.is_file():
        raise DataFileNotFoundError(f"--data_path {path}: no such file")
    try:
        with path.open("rb") as handle:
            records = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataFileError(f"--data_path {path}: not valid JSON ({exc})") from exc
    if not isinstance(records, list):
        raise DataFileError(f"--data_path {path}: expected a JSON list of records, got a JSON {json_kind(records)}")
    return records


def record_id(record: Any, index: int) -> str:
    """The record's `id` as text, or `#<index>` when it has none (for messages and batches)."""
    if isinstance(record, dict) and record.get("id") is not None:
        return str(record["id"])
    return f"#{index}"


def json_kind(value: Any) -> str:
    """The JSON name of a parsed value's type (object, array, string...), for messages."""
    return _JSON_KINDS.get(type(value), type(value).__name__)
