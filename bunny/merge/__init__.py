"""LoRA merge: a Bunny LoRA run + its base LLM -> one complete, self-contained model folder.

``merge_lora`` (Python) and ``bunny-merge`` / ``python -m bunny.merge`` (the tutorial's
``--model-path --model-base --model-type --save-model-path`` flags). Modules:
``inputs`` reads and checks the folders, ``assemble`` builds and merges the model in memory,
``shards`` writes safetensors shards from memory, ``merger`` ties them together atomically.
"""

from bunny.merge.cli import main
from bunny.merge.inputs import LoraRun, MergeError, read_lora_run
from bunny.merge.merger import MergeResult, merge_lora

__all__ = ["LoraRun", "MergeError", "MergeResult", "main", "merge_lora", "read_lora_run"]
