"""LoRA merge: a Bunny LoRA run + its base LLM -> one complete, self-contained model folder.

``merge_lora`` (Python) and ``bunny-merge`` / ``python -m bunny.merge`` (the tutorial's
``--model-path --model-base --model-type --save-model-path`` flags). Modules:
``inputs`` reads and checks the folders, ``adapter`` reads a LoRA adapter without PEFT,
``assemble`` checks the run's weights against the model (and holds PEFT's in-memory merge,
the fallback), ``stream`` merges tensor by tensor, ``shards`` writes safetensors shards one
tensor at a time, ``merger`` ties them together atomically.
The names below are imported on first use (PEP 562), so ``--help`` needs no torch.
"""

from __future__ import annotations

from bunny.lazy import lazy_exports

_LAZY_NAMES = {
    "main": "bunny.merge.cli",
    "LoraRun": "bunny.merge.inputs",
    "MergeError": "bunny.merge.inputs",
    "read_lora_run": "bunny.merge.inputs",
    "MergeResult": "bunny.merge.merger",
    "merge_lora": "bunny.merge.merger",
}

__all__ = ["LoraRun", "MergeError", "MergeResult", "main", "merge_lora", "read_lora_run"]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY_NAMES, globals())
