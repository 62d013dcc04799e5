"""The ZeRO configs shipped with the package, usable by name (``zero2``, ``zero3``) or path.

Batch size, accumulation, clipping and precision are ``"auto"``: HF Trainer fills them from
the command line, so one file serves every stage and GPU count.
"""

from __future__ import annotations

import json
from pathlib import Path

CONFIG_DIR = Path(__file__).with_name("ds_configs")
SHIPPED = {path.stem: path for path in sorted(CONFIG_DIR.glob("*.json"))}


def resolve_deepspeed_config(name_or_path: str | Path) -> Path:
    """A shipped config by name (``zero3`` or ``zero3.json``), else an existing JSON file."""
    key = Path(str(name_or_path)).stem if str(name_or_path).endswith(".json") else str(name_or_path)
    path = Path(name_or_path)
    if path.is_file():
        config = path
    elif key in SHIPPED and not path.parent.parts:
        config = SHIPPED[key]
    else:
        raise FileNotFoundError(f"--deepspeed {name_or_path}: no such file, and not a shipped config ({', '.join(SHIPPED)})")
    try:
        json.loads(config.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"--deepspeed {config}: not valid JSON ({error})") from error
    return config.resolve()
