"""Batched answers to questions (with or without an image) from a loaded Bunny model.

Prompts are the template's generation prompt (``bunny.conversation.generation_prompt``), left
padded so every row ends at the same position and generation continues all rows at once; the
KV cache is on. Only the answer comes back, whichever path the model's ``generate`` took: with
an image it returns the new tokens alone, for text-only input ids the prompt followed by them,
so a returned row that starts with the prompt has the prompt cut off.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bunny.cli import UserError
from bunny.constants import DEFAULT_IMAGE_TOKEN
from bunny.conversation import GPT, HUMAN, generation_prompt, tokenize_prompt
from bunny.data.images import load_image, process_image
from bunny.data.records import load_records, record_id
from bunny.generate.loading import LoadedModel
from bunny.generate.settings import GenerationSettings


@dataclass(frozen=True)
class Question:
    """One question; ``image`` is the image file's full path, or None for a text-only question."""

    id: str
    text: str
    image: Path | None = None
    reference: str | None = None  # the record's first answer, when it has one


def questions_from_records(records: Sequence[Any], data_path: str | Path, image_folder: str | Path | None) -> list[Question]:
    """The first human turn of each Bunny-format record as a question (its first answer, if
    any, as the reference). A record without a question, or an image without ``--image_folder``,
    is refused with its id."""
    problems = []
    questions = []
    folder = Path(image_folder) if image_folder is not None else None
    for index, record in enumerate(records):
        rid = record_id(record, index)
        turns = record.get("conversations") if isinstance(record, dict) else None
        first = turns[0] if isinstance(turns, list) and turns else None
        if not isinstance(first, dict) or first.get("from") != HUMAN or not isinstance(first.get("value"), str):
            problems.append(f"{data_path}: record {rid!r} (#{index}): no question (its first turn must be "
                            "a human turn with a string value)")
            continue
        image = record.get("image")
        if image is not None and folder is None:
            problems.append(f"{data_path}: record {rid!r} (#{index}) has an image: pass --image_folder")
            continue
        if image is None and DEFAULT_IMAGE_TOKEN in first["value"]:
            problems.append(f"{data_path}: record {rid!r} (#{index}): {DEFAULT_IMAGE_TOKEN} in a record without 'image'")
            continue
        answer = turns[1] if len(turns) > 1 and isinstance(turns[1], dict) and turns[1].get("from") == GPT else None
        reference = answer.get("value") if answer is not None and isinstance(answer.get("value"), str) else None
        questions.append(Question(rid, first["value"], folder / image if image is not None else None, reference))
    if problems:
        raise UserError(f"{len(problems)} record(s) of {data_path} cannot be asked", problems)
    return questions


def load_questions(data_path: str | Path, image_folder: str | Path | None) -> list[Question]:
    """:func:`questions_from_records` of a Bunny-format JSON file."""
    try:
        records = load_records(data_path)
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(str(exc).replace("--data_path", "questions file")) from exc
    return questions_from_records(records, data_path, image_folder)


@dataclass
class PromptBatch:
    """Left-padded prompt ids, their mask, and the pixel values of the rows with an image."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    images: torch.Tensor | None
    ids: list[str] = field(default_factory=list)


def encode_questions(loaded: LoadedModel, questions: Sequence[Question]) -> PromptBatch:
    """One batch of generation prompts; errors name the question."""
    rows: list[list[int]] = []
    pixels: list[torch.Tensor] = []
    for question in questions:
        has_image = question.image is not None
        try:
            prompt = generation_prompt(question.text, loaded.template, has_image)
            rows.append(tokenize_prompt(prompt, loaded.tokenizer))
            if has_image:
                if loaded.image_processor is None:
                    raise ValueError(f"model {loaded.source} has no image processor; it cannot take images")
                pixels.append(process_image(load_image(question.image), loaded.image_processor, loaded.image_aspect_ratio))
        except (OSError, ValueError) as exc:
            raise UserError(f"question {question.id!r}: {exc}") from exc
    width = max(len(row) for row in rows)
    pad = loaded.tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in rows])
    attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    images = torch.stack(pixels).to(loaded.device, loaded.dtype) if pixels else None
    return PromptBatch(input_ids.to(loaded.device), attention_mask.to(loaded.device), images, [q.id for q in questions])


def answer_tokens(output: torch.Tensor, prompt_ids: torch.Tensor) -> torch.Tensor:
    """The generated tokens of ``generate``'s output: the prompt is cut off when it is there."""
    width = prompt_ids.shape[1]
    if output.shape[1] >= width and torch.equal(output[:, :width], prompt_ids):
        return output[:, width:]
    return output


def decode_answer(tokens: torch.Tensor, tokenizer) -> str:
    """Text up to the first end-of-text token, special tokens dropped, outer spaces stripped."""
    ids = tokens.tolist()
    if tokenizer.eos_token_id in ids:
        ids = ids[: ids.index(tokenizer.eos_token_id)]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


@torch.inference_mode()
def answer_batch(loaded: LoadedModel, questions: Sequence[Question], settings: GenerationSettings) -> list[str]:
    """Answers to ``questions``, generated together in one batch."""
    batch = encode_questions(loaded, questions)
    tokenizer = loaded.tokenizer
    output = loaded.model.generate(
        batch.input_ids,
        images=batch.images,
        attention_mask=batch.attention_mask,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **settings.generate_kwargs(),
    )
    return [decode_answer(row, tokenizer) for row in answer_tokens(output, batch.input_ids)]


def iter_answers(
    loaded: LoadedModel,
    questions: Sequence[Question],
    settings: GenerationSettings = GenerationSettings(),
    batch_size: int = 8,
    progress: bool = False,
) -> Iterator[tuple[Question, str]]:
    """(question, answer) pairs in question order, ``batch_size`` questions per ``generate`` call."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise UserError(f"--batch_size must be positive, got {batch_size}")
    torch.manual_seed(settings.seed)
    with tqdm(total=len(questions), desc="answers", unit="q", disable=not progress) as bar:
        for start in range(0, len(questions), batch_size):
            chunk = questions[start:start + batch_size]
            yield from zip(chunk, answer_batch(loaded, chunk, settings))
            bar.update(len(chunk))


def generate_answers(
    loaded: LoadedModel,
    questions: Sequence[Question],
    settings: GenerationSettings = GenerationSettings(),
    batch_size: int = 8,
    progress: bool = False,
) -> list[str]:
    """The answer to every question, in order (see :func:`iter_answers`)."""
    return [answer for _question, answer in iter_answers(loaded, questions, settings, batch_size, progress)]


def answer_record(question: Question, answer: str) -> dict[str, Any]:
    """One line of the answers JSONL file."""
    return {"id": question.id, "question": question.text,
            "image": str(question.image) if question.image is not None else None, "answer": answer}


def dumps_jsonl(rows: Sequence[dict[str, Any]]) -> str:
    """Rows as JSON Lines text, one object per line."""
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
