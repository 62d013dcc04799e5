"""Length grouping for `--group_by_modality_length`: batches of one modality and similar length.

Image samples (positive lengths in `SupervisedDataset.modality_lengths`) and text-only samples
(negative lengths) are shuffled apart and cut into megabatches of ``batch_size * world_size``
samples (pass ``world_size = GPUs * gradient accumulation steps`` for one megabatch per optimizer
step, as LLaVA does). Inside a megabatch the samples are sorted by length and dealt into
``world_size`` batches of ``batch_size`` with similar total length; the megabatches are then
shuffled. Only the two leftover partial megabatches, placed last, can put both modalities in
one batch. The order depends on nothing but the lengths, the seed and the epoch.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


def _balanced_batches(megabatch: list[int], lengths: Sequence[int], batch_size: int, world_size: int) -> list[int]:
    """Deal a full megabatch, longest first, into `world_size` batches of similar total length."""
    batches: list[list[int]] = [[] for _ in range(world_size)]
    open_ranks = [(0, rank) for rank in range(world_size)]  # (total length, rank) of batches not yet full
    for index in sorted(megabatch, key=lambda i: abs(lengths[i]), reverse=True):
        total, rank = heapq.heappop(open_ranks)
        batches[rank].append(index)
        if len(batches[rank]) < batch_size:
            heapq.heappush(open_ranks, (total + abs(lengths[index]), rank))
    return [index for batch in batches for index in batch]


def _megabatches(group: list[int], lengths: Sequence[int], batch_size: int, world_size: int,
                 generator: torch.Generator) -> tuple[list[list[int]], list[int]]:
    """Full megabatches of a shuffled modality group, and its sorted leftover."""
    size = batch_size * world_size
    shuffled = [group[i] for i in torch.randperm(len(group), generator=generator).tolist()]
    full = len(shuffled) - len(shuffled) % size
    megabatches = [_balanced_batches(shuffled[start:start + size], lengths, batch_size, world_size)
                   for start in range(0, full, size)]
    leftover = sorted(shuffled[full:], key=lambda i: abs(lengths[i]), reverse=True)
    return megabatches, leftover


def modality_length_grouped_indices(
    lengths: Sequence[int], batch_size: int, world_size: int, generator: torch.Generator
) -> list[int]:
    """A permutation of ``range(len(lengths))`` grouped by modality (sign) and length."""
    if batch_size < 1 or world_size < 1:
        raise ValueError(f"batch_size and world_size must be positive, got {batch_size} and {world_size}")
    image_group = [i for i, length in enumerate(lengths) if length >= 0]
    text_group = [i for i, length in enumerate(lengths) if length < 0]
    image_megabatches, image_leftover = _megabatches(image_group, lengths, batch_size, world_size, generator)
    text_megabatches, text_leftover = _megabatches(text_group, lengths, batch_size, world_size, generator)
    megabatches = image_megabatches + text_megabatches
    order = torch.randperm(len(megabatches), generator=generator).tolist()
    return [index for m in order for index in megabatches[m]] + image_leftover + text_leftover


class ModalityLengthGroupedSampler(Sampler[int]):
    """Sampler over `modality_length_grouped_indices`, reshuffled by `set_epoch`."""

    def __init__(self, lengths: Sequence[int], batch_size: int, world_size: int = 1, seed: int = 0) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.world_size = world_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(modality_length_grouped_indices(self.lengths, self.batch_size, self.world_size, generator))
