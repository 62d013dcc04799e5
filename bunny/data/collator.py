"""Batches dataset items: right padding, attention mask, the batch's images in order."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from bunny.constants import IGNORE_INDEX


@dataclass
class DataCollator:
    """Batch ``{"input_ids", "labels", "attention_mask", "images" (only if any), "mismatched_ids"}``.

    ``images`` stacks the pixel values of the batch's image samples in batch order, matching the
    order of their ``IMAGE_TOKEN_INDEX`` ids; ``mismatched_ids`` lists the samples whose label
    masking failed (all their labels are ignored), for the trainer to log.
    """

    tokenizer: PreTrainedTokenizerBase

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            raise ValueError(f"{type(self.tokenizer).__name__} has no pad token; set one before batching")
        length = max(len(item["input_ids"]) for item in items)
        input_ids = torch.full((len(items), length), pad_id, dtype=torch.long)
        labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(items), length), dtype=torch.bool)
        for row, item in enumerate(items):
            size = len(item["input_ids"])
            input_ids[row, :size] = item["input_ids"]
            labels[row, :size] = item["labels"]
            attention_mask[row, :size] = True
        batch: dict[str, Any] = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
        images = [item["pixel_values"] for item in items if item["pixel_values"] is not None]
        if images:
            batch["images"] = torch.stack(images)
        batch["mismatched_ids"] = [item["id"] for item in items if item["mismatch"]]
        return batch
