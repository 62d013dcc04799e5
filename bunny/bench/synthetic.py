"""Synthetic benchmark data: photo-sized JPEGs and conversations of an exact token length.

Throughput depends on the sequence length, not on what the text says, so every record of a
stage is built to tokenize to the reference length: pretrain 64 text tokens after the 729 image
tokens (``plain`` template), recipes 320 (``phi3`` template, a short question and a long
answer). Images are JPEGs of several photo sizes and aspect ratios, so the dataloader decodes
and resizes (or pads) them as it would real data.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw
from transformers import PreTrainedTokenizerBase

from bunny.constants import DEFAULT_IMAGE_TOKEN
from bunny.conversation import tokenize_conversation
from bunny.tiny.tokenizer import COLOURS, SHAPES, SIZES

PHOTO_SIZES = ((640, 480), (480, 640), (512, 512), (800, 533), (500, 375), (1024, 768))
WORDS = tuple(f"{size} {colour} {shape}" for colour in COLOURS for shape in SHAPES for size in SIZES)
FILLER = "a"  # one token in the tiny tokenizer: fills the last few positions exactly
QUESTION = "Describe the image in detail."
DISTINCT_TEXTS = 8  # records cycle through this many texts of the same length
DISTINCT_IMAGES = 32


@dataclass(frozen=True)
class StageData:
    """A written dataset: where it is, and the token lengths it really has."""

    data_path: Path
    image_folder: Path
    records: int
    text_tokens: int  # ids of a record other than the image placeholder (BOS included)
    supervised_tokens: int  # of those, the ones with a trained label


def draw_photo(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    """A smooth gradient with a few filled shapes: compresses and decodes like a photo."""
    width, height = size
    top, bottom = [tuple(rng.randrange(256) for _ in range(3)) for _ in range(2)]
    gradient = Image.linear_gradient("L").resize((width, height))
    image = Image.composite(Image.new("RGB", size, top), Image.new("RGB", size, bottom), gradient)
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y = rng.randrange(width), rng.randrange(height)
        r = rng.randrange(10, max(11, min(width, height) // 3))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
    return image


def _conversation(template: str, text: str) -> list[dict[str, str]]:
    if template == "plain":
        return [{"from": "human", "value": DEFAULT_IMAGE_TOKEN}, {"from": "gpt", "value": text}]
    return [{"from": "human", "value": f"{DEFAULT_IMAGE_TOKEN}\n{QUESTION}"}, {"from": "gpt", "value": text}]


def _text_tokens(template: str, text: str, tokenizer: PreTrainedTokenizerBase, max_length: int) -> tuple[int, int]:
    sample = tokenize_conversation(_conversation(template, text), tokenizer, template, True, max_length)
    if sample.mismatch:
        raise ValueError(f"synthetic text could not be masked with template {template!r}: {text[:80]!r}")
    return len(sample.input_ids) - 1, sum(label >= 0 for label in sample.labels)


def exact_length_text(
    template: str, target: int, tokenizer: PreTrainedTokenizerBase, seed: int, max_length: int
) -> tuple[str, int]:
    """An answer (caption) whose record tokenizes to exactly ``target`` text tokens; returns it
    with its supervised token count. Words are added while the record is shorter than the
    target, then the last word is traded for one-token fillers until the length is exact."""
    rng = random.Random(f"bunny-bench-text-{seed}")
    words: list[str] = []
    length, _ = _text_tokens(template, "", tokenizer, max_length)
    if length > target:
        raise ValueError(f"the {template!r} template alone takes {length} tokens, more than the target {target}")
    while length < target:
        words.append(rng.choice(WORDS))
        length, _ = _text_tokens(template, " ".join(words), tokenizer, max_length)
    if length > target:
        words.pop()
        while True:
            words.append(FILLER)
            length, _ = _text_tokens(template, " ".join(words), tokenizer, max_length)
            if length >= target:
                break
    text = " ".join(words)
    length, supervised = _text_tokens(template, text, tokenizer, max_length)
    if length != target:
        raise ValueError(f"could not build a {template!r} text of exactly {target} tokens (got {length})")
    return text, supervised


def write_stage_data(
    folder: Path,
    template: str,
    records: int,
    text_tokens: int,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    seed: int = 0,
) -> StageData:
    """``records`` image records in Bunny's JSON format plus their JPEGs, under ``folder``."""
    image_folder = folder / "images"
    image_folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"bunny-bench-images-{seed}")
    names = []
    for index in range(min(records, DISTINCT_IMAGES)):
        name = f"{index:05d}.jpg"
        draw_photo(rng, PHOTO_SIZES[index % len(PHOTO_SIZES)]).save(image_folder / name, quality=90)
        names.append(name)
    texts = [exact_length_text(template, text_tokens, tokenizer, seed + i, max_length) for i in range(DISTINCT_TEXTS)]
    rows = [
        {"id": f"bench-{index:06d}", "image": names[index % len(names)],
         "conversations": _conversation(template, texts[index % len(texts)][0])}
        for index in range(records)
    ]
    data_path = folder / "data.json"
    data_path.write_text(json.dumps(rows))
    supervised = round(sum(texts[index % len(texts)][1] for index in range(records)) / records)
    return StageData(data_path, image_folder, records, text_tokens, supervised)
