"""Scoring one model on a held-out Bunny-format file: answer loss, answer accuracy, per record.

* answer loss: the mean negative log-likelihood per supervised token, teacher forced, the
  supervised tokens being exactly those training supervises (``bunny.evaluate.loss``);
  records are batched through the training dataset and collator;
* answer accuracy: the greedy answer to each record's first question against its first
  answer, after ``normalize_answer``; ``empty_share`` counts answers that normalise to nothing.

Everything is deterministic (eval mode, greedy decoding, records in file order). Data are
checked once (``load_eval_data``: every training check, plus an answer in every record) and
can be shared by many models, as the weight search does.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from bunny.cli import UserError
from bunny.data import DataCollator, SupervisedDataset, validate_records
from bunny.data.records import load_records, record_id
from bunny.evaluate.loss import RowLoss, batch_answer_loss, image_width
from bunny.evaluate.normalize import answers_match, normalize_answer
from bunny.evaluate.settings import DEFAULT_MAX_NEW_TOKENS, EvalSettings  # noqa: F401  (re-exported)
from bunny.generate.answers import GenerationSettings, generate_answers, questions_from_records
from bunny.generate.loading import LoadedModel

class EvalDataError(UserError):
    """A held-out file that cannot be scored; ``problems`` names each record."""


@dataclass(frozen=True)
class EvalData:
    """Checked held-out records, and where they and their images come from."""

    path: Path
    image_folder: Path | None
    template: str
    records: list[dict[str, Any]]


@dataclass(frozen=True)
class RecordResult:
    id: str
    nll: float  # summed over the record's supervised tokens (nats)
    tokens: int
    loss: float | None  # nll / tokens; None when the record has no supervised token left
    question: str
    reference: str
    answer: str | None = None
    correct: bool | None = None
    empty: bool | None = None


@dataclass(frozen=True)
class EvalSummary:
    model: str
    data: str
    records: int
    tokens: int
    answer_loss: float
    accuracy: float | None
    empty_share: float | None
    unscored_records: int  # records whose masking failed or that were cut before any answer


@dataclass(frozen=True)
class EvalResult:
    summary: EvalSummary
    records: list[RecordResult]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self.summary)


def load_eval_data(data_path: str | Path, image_folder: str | Path | None, template: str = "phi3") -> EvalData:
    """Load and check a held-out file: every training check (images opened; a gpt turn without
    reference text is one of them); all problems are reported together, each naming its record."""
    path = Path(data_path)
    try:
        records = load_records(path)
    except (FileNotFoundError, ValueError) as exc:
        raise EvalDataError(str(exc).replace("--data_path", "held-out data")) from exc
    if not records:
        raise EvalDataError(f"held-out data {path} holds no records")
    problems = [(p.index, str(p)) for p in validate_records(records, path, image_folder, template)]
    problems.sort(key=lambda problem: problem[0])
    if problems:
        raise EvalDataError(f"{len(problems)} problem(s) in held-out data {path}", [text for _, text in problems])
    return EvalData(path, Path(image_folder) if image_folder is not None else None, template, records)


def _batches(loaded: LoadedModel, data: EvalData, batch_size: int) -> DataLoader:
    dataset = SupervisedDataset(
        data.path, loaded.tokenizer, loaded.image_processor, data.template, data.image_folder,
        loaded.image_aspect_ratio, loaded.max_length, records=data.records,
    )
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=DataCollator(loaded.tokenizer))


def _to_device(batch: dict[str, Any], loaded: LoadedModel) -> dict[str, Any]:
    moved = {key: value.to(loaded.device) for key, value in batch.items() if isinstance(value, torch.Tensor)}
    if "images" in moved:
        moved["images"] = moved["images"].to(loaded.dtype)
    return moved


@torch.no_grad()
def answer_losses(loaded: LoadedModel, data: EvalData, batch_size: int = 8, progress: bool = False) -> list[RowLoss]:
    """Each record's teacher-forced answer loss, in file order."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise UserError(f"--batch_size must be positive, got {batch_size}")
    model = loaded.model.eval()
    width: int | None = None
    losses: list[RowLoss] = []
    with tqdm(total=len(data.records), desc="answer loss", unit="rec", disable=not progress) as bar:
        for batch in _batches(loaded, data, batch_size):
            batch = _to_device(batch, loaded)
            if width is None and "images" in batch:
                width = image_width(model, batch["images"])
            losses += batch_answer_loss(model, batch, width)
            bar.update(len(batch["input_ids"]))
    return losses


def answer_loss(losses: list[RowLoss]) -> float:
    """Mean NLL per supervised token over all records (training's own averaging)."""
    tokens = sum(row.tokens for row in losses)
    return sum(row.nll for row in losses) / tokens if tokens else math.nan


def evaluate_model(loaded: LoadedModel, data: EvalData, settings: EvalSettings = EvalSettings(), name: str | None = None) -> EvalResult:
    """Answer loss and (unless ``settings.accuracy`` is off) answer accuracy of one model."""
    started = time.perf_counter()
    losses = answer_losses(loaded, data, settings.batch_size, settings.progress)
    questions = questions_from_records(data.records, data.path, data.image_folder)
    answers: list[str | None] = [None] * len(questions)
    if settings.accuracy:
        greedy = GenerationSettings(max_new_tokens=settings.max_new_tokens)
        answers = list(generate_answers(loaded, questions, greedy, settings.batch_size, settings.progress))
    results = []
    for question, loss, answer in zip(questions, losses, answers, strict=True):
        results.append(RecordResult(
            id=question.id, nll=loss.nll, tokens=loss.tokens, loss=loss.mean if loss.tokens else None,
            question=question.text, reference=question.reference or "", answer=answer,
            correct=None if answer is None else answers_match(answer, question.reference or ""),
            empty=None if answer is None else not normalize_answer(answer),
        ))
    scored = len(results)
    summary = EvalSummary(
        model=name or str(loaded.source),
        data=str(data.path),
        records=scored,
        tokens=sum(r.tokens for r in results),
        answer_loss=answer_loss(losses),
        accuracy=sum(bool(r.correct) for r in results) / scored if settings.accuracy else None,
        empty_share=sum(bool(r.empty) for r in results) / scored if settings.accuracy else None,
        unscored_records=sum(r.tokens == 0 for r in results),
    )
    return EvalResult(summary, results, time.perf_counter() - started)
