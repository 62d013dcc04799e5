"""LoRA merge: a Bunny LoRA run + its base LLM -> one complete, self-contained model folder.

``merge_lora`` (Python) and ``bunny-merge`` / ``python -m bunny.merge`` (the tutorial's
``--model-path --model-base --model-type --save-model-path`` flags). Modules:
``inputs`` reads and checks the folders, ``assemble`` builds and merges the model in memory,
``shards`` writes safetensors shards from memory, ``merger`` ties them together atomically.
The names below are imported on first use (PEP 562), so ``--help`` needs no torch.
"""

from __future__ import annotations

import importlib

_LAZY_NAMES = {
    "main": "bunny.merge.cli",
    "LoraRun": "bunny.merge.inputs",
    "MergeError": "bunny.merge.inputs",
    "read_lora_run": "bunny.merge.inputs",
    "MergeResult": "bunny.merge.merger",
    "merge_lora": "bunny.merge.merger",
}

__all__ = ["LoraRun", "MergeError", "MergeResult", "main", "merge_lora", "read_lora_run"]


def __getattr__(name: str):
    if name not in _LAZY_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY_NAMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY_NAMES})
