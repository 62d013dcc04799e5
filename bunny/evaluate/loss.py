"""Teacher-forced answer loss, per record, with exactly the training masking.

Batches come from the training pipeline itself (``SupervisedDataset`` + ``DataCollator``), so
the supervised tokens are the ones ``train.py`` trains. The model runs its ordinary forward
(no labels: full logits). Its logits are laid out after image splicing, where each
``IMAGE_TOKEN_INDEX`` has become the image's patch positions and every row is right padded
again; the labels are moved the same way here: a row's labels after its image shift by the
image's width minus one (validated records hold one image, in the first human turn, before
every answer). That width is measured once per model from the logits of an image-only input,
so nothing inside the model is relied on. Positions past the model's length limit are cut as
the model cuts them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bunny.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX


@dataclass(frozen=True)
class RowLoss:
    """Summed negative log-likelihood (nats) of one record's supervised tokens, and their count."""

    nll: float
    tokens: int

    @property
    def mean(self) -> float:
        return self.nll / self.tokens if self.tokens else float("nan")


@torch.no_grad()
def image_width(model, images: torch.Tensor) -> int:
    """Positions one image occupies in the model's input: the logits length of an image alone."""
    probe = torch.tensor([[IMAGE_TOKEN_INDEX]], device=images.device)
    return model(input_ids=probe, attention_mask=torch.ones_like(probe), images=images[:1]).logits.shape[1]


def spliced_labels(labels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   width: int | None, length: int) -> torch.Tensor:
    """``labels`` moved to the positions their tokens take once each image is ``width`` positions
    wide, right padded (and cut) to ``length``."""
    batch, seq = labels.shape
    valid = attention_mask.bool()
    is_image = (input_ids == IMAGE_TOKEN_INDEX) & valid
    if is_image.sum(1).max() > 1:
        raise ValueError("a record holds more than one image; validated records hold one")
    step = torch.where(is_image, width or 1, 1) * valid
    target = step.cumsum(1) - step  # where each input position starts in the spliced row
    out = torch.full((batch, length), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
    keep = valid & ~is_image & (target < length)
    rows, cols = keep.nonzero(as_tuple=True)
    out[rows, target[rows, cols]] = labels[rows, cols]
    return out


@torch.no_grad()
def batch_answer_loss(model, batch: dict[str, torch.Tensor], width: int | None) -> list[RowLoss]:
    """Per-row answer loss of one collated batch (``width``: see :func:`image_width`)."""
    images = batch.get("images")
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], images=images).logits
    labels = spliced_labels(batch["labels"], batch["input_ids"], batch["attention_mask"], width, logits.shape[1])
    target = labels[:, 1:]
    supervised = target != IGNORE_INDEX
    token_nll = F.cross_entropy(logits[:, :-1][supervised].float(), target[supervised], reduction="none")
    rows = supervised.nonzero(as_tuple=True)[0]
    nll = torch.zeros(len(labels), dtype=torch.float64, device=labels.device).index_add_(0, rows, token_nll.double())
    return [RowLoss(row_nll, row_count) for row_nll, row_count in zip(nll.tolist(), supervised.sum(1).tolist())]
