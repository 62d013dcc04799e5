"""The training dataset: records parsed once, each item tokenized and decoded when asked for.

Nothing is preprocessed up front, so a 2M-record file is ready in the time `json.load` takes,
and DataLoader worker processes do the tokenizing and image decoding in parallel. The dataset
does not validate: `train.py` runs `validate_dataset` first (and may hand its records over).
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from bunny.conversation import get_template, tokenize_conversation
from bunny.data.images import ASPECT_RATIOS, load_image, process_image
from bunny.data.records import Record, load_records, record_id

IMAGE_LENGTH_ESTIMATE = 128  # words an image counts for in length grouping (as LLaVA does)


class SupervisedDataset(Dataset):
    """Items ``{"id", "input_ids", "labels", "pixel_values" (None for text-only), "mismatch"}``."""

    def __init__(
        self,
        data_path: str | Path,
        tokenizer: PreTrainedTokenizerBase,
        image_processor: Any,
        template_name: str,
        image_folder: str | Path | None,
        image_aspect_ratio: str,
        model_max_length: int,
        records: list[Record] | None = None,
    ) -> None:
        get_template(template_name)
        if image_aspect_ratio not in ASPECT_RATIOS:
            raise ValueError(f"--image_aspect_ratio {image_aspect_ratio!r} is not supported; "
                             f"use one of {', '.join(ASPECT_RATIOS)}")
        self.data_path = str(data_path)
        self.records = records if records is not None else load_records(data_path)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.template_name = template_name
        self.image_folder = Path(image_folder) if image_folder is not None else None
        self.image_aspect_ratio = image_aspect_ratio
        self.model_max_length = model_max_length

    def __len__(self) -> int:
        return len(self.records)

    def _word_count(self, record: Record) -> int:
        return max(1, sum(len(turn["value"].split()) for turn in record["conversations"]))

    @cached_property
    def lengths(self) -> list[int]:
        """Cheap length estimates: words of all turns, plus IMAGE_LENGTH_ESTIMATE for an image."""
        return [self._word_count(r) + (IMAGE_LENGTH_ESTIMATE if "image" in r else 0) for r in self.records]

    @cached_property
    def modality_lengths(self) -> list[int]:
        """Word counts, positive for image samples and negative for text-only ones."""
        return [self._word_count(r) if "image" in r else -self._word_count(r) for r in self.records]

    def _pixel_values(self, image: str) -> torch.Tensor:
        if self.image_processor is None:
            raise ValueError("an image record needs an image processor (is --vision_tower set?)")
        if self.image_folder is None:
            raise ValueError("an image record needs --image_folder")
        return process_image(load_image(self.image_folder / image), self.image_processor, self.image_aspect_ratio)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        has_image = "image" in record
        try:
            sample = tokenize_conversation(record["conversations"], self.tokenizer, self.template_name,
                                           has_image, self.model_max_length)
            pixel_values = self._pixel_values(record["image"]) if has_image else None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{self.data_path}: record {record_id(record, index)!r} (#{index}): {exc}") from exc
        return {
            "id": record_id(record, index),
            "input_ids": torch.tensor(sample.input_ids, dtype=torch.long),
            "labels": torch.tensor(sample.labels, dtype=torch.long),
            "pixel_values": pixel_values,
            "mismatch": sample.mismatch,
        }
