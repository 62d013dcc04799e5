"""Synthetic shape images and Bunny/LLaVA-format records whose text the images determine.

Every caption and answer follows from what is drawn (shape, colour, background, size), so a
tiny model trained on them can lower its loss, and a held-out split of fresh images measures
whether it did. Images come in several sizes and aspect ratios so that `--image_aspect_ratio
pad` and `square` give different pixels. Everything is drawn from `random.Random` seeded with
strings, so the same seed gives the same bytes on every run and platform.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from bunny.constants import DEFAULT_IMAGE_TOKEN

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Saturated shapes on neutral backgrounds: "the shape's colour" and "the background's" never
# name the same colours, so a model can answer either from what the image holds without
# first working out which of two colours is the shape's.
SHAPE_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 215),
    "yellow": (240, 210, 40),
    "purple": (135, 60, 185),
    "orange": (245, 140, 30),
}
BACKGROUND_COLORS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "grey": (128, 128, 128),
}
COLORS: dict[str, tuple[int, int, int]] = {**SHAPE_COLORS, **BACKGROUND_COLORS}
# Moderate aspect ratios (up to 5:4), so that `--image_aspect_ratio pad` and `square` give
# different pixels while the shape still fills much of the padded square.
IMAGE_SIZES: tuple[tuple[int, int], ...] = (
    (64, 64), (48, 48), (80, 64), (64, 80), (60, 48), (48, 60), (72, 72), (56, 56),
)
# The shape is centred, its side this share of the image's short side: the central patches
# show the shape's colour and the corner patches the background, whatever the size.
SIZE_FRACTIONS: dict[str, tuple[float, float]] = {"small": (0.45, 0.55), "large": (0.75, 0.9)}
TEXT_ONLY_FRACTION = 0.15
MULTI_ROUND_FRACTION = 0.3
IMAGE_AT_END_FRACTION = 0.2
# LLaVA-1.5's instruction for its short-answer (VQA) data: a question carrying it is answered with
# a word or phrase ("Red."), one without it with a sentence ("The circle is red."). Recipe-1
# and the held-out split are all short answers; recipe-2 mixes both, as llava_1.4m does, so
# each recipe and their average know which style a held-out question asks for.
SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
RECIPE2_SHORT_FRACTION = 0.5

PRETRAIN_JSON = "pretrain/bunny_pretrain_tiny.json"
PRETRAIN_IMAGES = "pretrain/images"
RECIPE1_JSON = "finetune/bunny_695k_tiny.json"
RECIPE2_JSON = "finetune/bunny_llava_1.4m_tiny.json"
HELDOUT_JSON = "finetune/bunny_heldout_tiny.json"
FINETUNE_IMAGES = "finetune/images"

Record = dict[str, Any]
Turn = tuple[str, str]


@dataclass(frozen=True)
class Scene:
    """One image's content: what the text about it may say, and where it is drawn."""

    shape: str
    color: str
    background: str
    size: str
    width: int
    height: int
    box: tuple[int, int, int, int]  # left, top, right, bottom of the shape
    jitter: tuple[int, int, int]  # small colour offset so pixels are not all identical


def sample_scene(rng: random.Random) -> Scene:
    """Draw a random scene: a shape of a saturated colour, centred (within a pixel or two) on a
    neutral background."""
    shape = rng.choice(SHAPES)
    color = rng.choice(list(SHAPE_COLORS))
    background = rng.choice(list(BACKGROUND_COLORS))
    size = rng.choice(list(SIZE_FRACTIONS))
    width, height = rng.choice(IMAGE_SIZES)
    low, high = SIZE_FRACTIONS[size]
    extent = max(6, round(min(width, height) * rng.uniform(low, high)))
    left = (width - extent) // 2 + rng.randint(-2, 2)
    top = (height - extent) // 2 + rng.randint(-2, 2)
    jitter = (rng.randint(-12, 12), rng.randint(-12, 12), rng.randint(-12, 12))
    return Scene(shape, color, background, size, width, height,
                 (left, top, left + extent, top + extent), jitter)


def _shade(rgb: tuple[int, int, int], jitter: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + j)) for c, j in zip(rgb, jitter))  # type: ignore[return-value]


def draw_scene(scene: Scene) -> Image.Image:
    """Render a scene as an RGB image."""
    image = Image.new("RGB", (scene.width, scene.height), COLORS[scene.background])
    draw = ImageDraw.Draw(image)
    fill = _shade(COLORS[scene.color], scene.jitter)
    left, top, right, bottom = scene.box
    if scene.shape == "circle":
        draw.ellipse((left, top, right - 1, bottom - 1), fill=fill)
    elif scene.shape == "square":
        draw.rectangle((left, top, right - 1, bottom - 1), fill=fill)
    else:
        draw.polygon([((left + right) / 2, top), (right - 1, bottom - 1), (left, bottom - 1)], fill=fill)
    return image


def caption(scene: Scene) -> str:
    """Pretrain caption, lower case like web alt-text."""
    return f"a {scene.size} {scene.color} {scene.shape} on a {scene.background} background."


# --- questions about an image: (question, short answer, long answer) ---------------------------

def _ask_shape(scene: Scene, rng: random.Random) -> tuple[str, str, str]:
    question = rng.choice(["What shape is shown?", "Name the shape in the image."])
    return question, f"A {scene.shape}.", f"The image shows a {scene.shape}."


def _ask_color(scene: Scene, rng: random.Random) -> tuple[str, str, str]:
    question = "What color is the shape?"
    return question, f"{scene.color.capitalize()}.", f"The {scene.shape} is {scene.color}."


def _ask_background(scene: Scene, rng: random.Random) -> tuple[str, str, str]:
    question = "What color is the background?"
    return question, f"{scene.background.capitalize()}.", f"The background is {scene.background}."


def _ask_size(scene: Scene, rng: random.Random) -> tuple[str, str, str]:
    question = "Is the shape small or large?"
    return question, f"{scene.size.capitalize()}.", f"The {scene.shape} is {scene.size}."


def _ask_presence(scene: Scene, rng: random.Random) -> tuple[str, str, str]:
    asked = rng.choice(SHAPES)
    question = f"Is there a {asked} in the image?"
    if asked == scene.shape:
        return question, "Yes.", f"Yes, there is a {asked} in the image."
    return question, "No.", f"No, the image shows a {scene.shape}, not a {asked}."


def _ask_description(scene: Scene, rng: random.Random) -> tuple[str, str, str]:
    question = "Describe the image briefly."
    text = f"{scene.size} {scene.color} {scene.shape} on a {scene.background} background."
    return question, f"A {text}", f"The image shows a {text}"


IMAGE_QUESTIONS: tuple[Callable[[Scene, random.Random], tuple[str, str, str]], ...] = (
    _ask_shape, _ask_color, _ask_background, _ask_size, _ask_presence, _ask_description,
)
# How often each of IMAGE_QUESTIONS is drawn: shape and colour, the questions only the shape
# itself answers, make up 60% of the image questions, so that a few hundred training examples
# hold enough of them.
IMAGE_QUESTION_WEIGHTS: tuple[int, ...] = (3, 3, 1, 1, 1, 1)

# What a uniform guess scores on each kind of image question: kind, how to recognise the
# question (without the short-answer instruction), how many answers a guesser chooses from.
QUESTION_KINDS: tuple[tuple[str, str, int], ...] = (
    ("shape", r"^(What shape|Name the shape)", len(SHAPES)),
    ("colour", r"^What color is the (shape|circle|square|triangle)\?$", len(SHAPE_COLORS)),
    ("background", r"background", len(BACKGROUND_COLORS)),
    ("size", r"small or large|large or small", len(SIZE_FRACTIONS)),
    ("presence", r"^Is there a", 2),
)


def question_kind(question: str) -> tuple[str, int] | None:
    """The kind of an image question and its number of possible answers (None: open-ended or text-only)."""
    question = question.replace(DEFAULT_IMAGE_TOKEN, "").strip().removesuffix(SHORT_ANSWER_PROMPT).strip()
    for kind, pattern, choices in QUESTION_KINDS:
        if re.search(pattern, question):
            return kind, choices
    return None


# --- text-only questions: (question, short answer, long answer) ---------------------------------

ANTONYMS: dict[str, str] = {
    "big": "small", "hot": "cold", "up": "down", "fast": "slow", "light": "dark",
    "open": "closed", "happy": "sad", "early": "late", "full": "empty", "hard": "soft",
}
WORDS: tuple[str, ...] = ("cat", "tree", "house", "river", "apple", "window", "garden", "pencil", "cloud", "bridge")


def _ask_sum(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    return f"What is {a} + {b}?", f"{a + b}.", f"{a} + {b} = {a + b}."


def _ask_difference(rng: random.Random) -> tuple[str, str, str]:
    a = rng.randint(0, 20)
    b = rng.randint(0, a)
    return f"What is {a} minus {b}?", f"{a - b}.", f"{a} minus {b} is {a - b}."


def _ask_antonym(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(list(ANTONYMS))
    opposite = ANTONYMS[word]
    return (f"What is the opposite of \"{word}\"?", f"{opposite.capitalize()}.",
            f"The opposite of \"{word}\" is \"{opposite}\".")


def _ask_letters(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(WORDS)
    return (f"How many letters are in the word \"{word}\"?", f"{len(word)}.",
            f"The word \"{word}\" has {len(word)} letters.")


def _ask_reverse(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(WORDS)
    return f"Spell \"{word}\" backwards.", f"{word[::-1]}.", f"\"{word}\" spelled backwards is \"{word[::-1]}\"."


TEXT_QUESTIONS: tuple[Callable[[random.Random], tuple[str, str, str]], ...] = (
    _ask_sum, _ask_difference, _ask_antonym, _ask_letters, _ask_reverse,
)


def _conversations(turns: list[Turn], with_image: bool, image_at_end: bool) -> list[dict[str, str]]:
    """Bunny/LLaVA turns; an image record carries one `<image>` in its first human turn."""
    messages: list[dict[str, str]] = []
    for index, (question, answer) in enumerate(turns):
        if with_image and index == 0:
            question = f"{question}\n{DEFAULT_IMAGE_TOKEN}" if image_at_end else f"{DEFAULT_IMAGE_TOKEN}\n{question}"
        messages.append({"from": "human", "value": question})
        messages.append({"from": "gpt", "value": answer})
    return messages


def _styled(rng: random.Random, question: str, short: str, long: str, short_fraction: float) -> Turn:
    """A turn in one answer style: short answers are asked for with `SHORT_ANSWER_PROMPT`.
    An all-short split draws nothing, so its records are those of the same seed before the
    instruction existed, plus the instruction."""
    if short_fraction >= 1 or rng.random() < short_fraction:
        return f"{question} {SHORT_ANSWER_PROMPT}", short
    return question, long


def _draw_askers(rng: random.Random, rounds: int) -> list[Callable[[Scene, random.Random], tuple[str, str, str]]]:
    """`rounds` different kinds of image question, drawn by `IMAGE_QUESTION_WEIGHTS`."""
    left = list(zip(IMAGE_QUESTIONS, IMAGE_QUESTION_WEIGHTS))
    askers = []
    for _ in range(rounds):
        index = rng.choices(range(len(left)), weights=[weight for _, weight in left])[0]
        askers.append(left.pop(index)[0])
    return askers


def draw_image_question(scene: Scene, rng: random.Random) -> tuple[str, str, str]:
    """One question about `scene`, drawn by `IMAGE_QUESTION_WEIGHTS`: (question, short answer, long answer)."""
    return _draw_askers(rng, 1)[0](scene, rng)


def _image_turns(scene: Scene, rng: random.Random, rounds: int, short_fraction: float) -> list[Turn]:
    askers = _draw_askers(rng, rounds)
    asked = [asker(scene, rng) for asker in askers]
    return [_styled(rng, question, short, long, short_fraction) for question, short, long in asked]


def _text_turns(rng: random.Random, rounds: int, short_fraction: float, exclude: set[str]) -> list[Turn]:
    turns: list[Turn] = []
    asked: set[str] = set()
    for _attempt in range(10_000):
        question, short, long = rng.choice(TEXT_QUESTIONS)(rng)
        if question not in exclude and question not in asked:
            asked.add(question)
            turns.append(_styled(rng, question, short, long, short_fraction))
            if len(turns) == rounds:
                return turns
    raise ValueError(f"found no {rounds} text questions outside the {len(exclude)} excluded ones; "
                     "lower n_finetune or n_heldout")


class _SceneSource:
    """Hands out scenes whose drawing differs from every scene handed out before (any split)."""

    def __init__(self) -> None:
        self._seen: set[Scene] = set()

    def new(self, rng: random.Random) -> Scene:
        while True:
            scene = sample_scene(rng)
            if scene not in self._seen:
                self._seen.add(scene)
                return scene


def _save_images(scenes: dict[str, Scene], image_folder: Path) -> None:
    for relative, scene in scenes.items():
        path = image_folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        draw_scene(scene).save(path, format="PNG")


def _write_json(records: list[Record], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _pretrain_records(rng: random.Random, scenes: _SceneSource, n: int) -> tuple[list[Record], dict[str, Scene]]:
    records: list[Record] = []
    images: dict[str, Scene] = {}
    for index in range(n):
        scene = scenes.new(rng)
        relative = f"{index // 100:03d}/{index:05d}.png"
        images[relative] = scene
        records.append({
            "id": f"pretrain-{index:05d}",
            "image": relative,
            "conversations": [
                {"from": "human", "value": DEFAULT_IMAGE_TOKEN},
                {"from": "gpt", "value": caption(scene)},
            ],
        })
    return records, images


def image_record_count(n: int) -> int:
    """How many of `n` question/answer records are about an image (the rest are text-only)."""
    return n - round(n * TEXT_ONLY_FRACTION)


def _chat_records(
    rng: random.Random,
    prefix: str,
    n: int,
    pool: list[tuple[str, Scene]],
    short_fraction: float,
    exclude_text: set[str],
) -> list[Record]:
    """`n` question/answer records: ~15% text-only, the rest about the images of `pool`, in pool
    order; a `short_fraction` of the questions ask for (and get) a short answer."""
    n_image = image_record_count(n)
    n_text = n - n_image
    if n_image > len(pool):
        raise ValueError(f"{prefix}: {n_image} image records need {n_image} images, the pool has {len(pool)}")
    n_multi_image = round(n_image * MULTI_ROUND_FRACTION)
    kinds = (["image-multi"] * n_multi_image + ["image"] * (n_image - n_multi_image)
             + ["text-multi"] * (n_text // 3) + ["text"] * (n_text - n_text // 3))
    rng.shuffle(kinds)
    images = iter(pool)
    records: list[Record] = []
    for index, kind in enumerate(kinds):
        rounds = rng.randint(2, 3) if kind.endswith("-multi") else 1
        record: Record = {"id": f"{prefix}-{index:05d}"}
        if kind.startswith("image"):
            relative, scene = next(images)
            record["image"] = relative
            turns = _image_turns(scene, rng, rounds, short_fraction)
            record["conversations"] = _conversations(turns, True, rng.random() < IMAGE_AT_END_FRACTION)
        else:
            turns = _text_turns(rng, rounds, short_fraction, exclude_text)
            record["conversations"] = _conversations(turns, False, False)
        records.append(record)
    return records


def _text_questions(records: list[Record]) -> set[str]:
    """The text-only questions asked, without the short-answer instruction."""
    return {turn["value"].removesuffix(f" {SHORT_ANSWER_PROMPT}") for record in records if "image" not in record
            for turn in record["conversations"] if turn["from"] == "human"}


@dataclass(frozen=True)
class TinyDataPaths:
    """Where `write_tiny_datasets` put each file, as absolute paths."""

    pretrain_data: Path
    pretrain_images: Path
    recipe1_data: Path
    recipe2_data: Path
    finetune_images: Path
    heldout_data: Path

    @classmethod
    def under(cls, root: Path) -> "TinyDataPaths":
        """The one layout of the splits below an assets folder."""
        return cls(
            pretrain_data=root / PRETRAIN_JSON,
            pretrain_images=root / PRETRAIN_IMAGES,
            recipe1_data=root / RECIPE1_JSON,
            recipe2_data=root / RECIPE2_JSON,
            finetune_images=root / FINETUNE_IMAGES,
            heldout_data=root / HELDOUT_JSON,
        )


def check_sizes(n_pretrain: int, n_finetune: int, n_heldout: int) -> None:
    """Reject split sizes below one record."""
    for name, value in (("n_pretrain", n_pretrain), ("n_finetune", n_finetune), ("n_heldout", n_heldout)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")


def write_tiny_datasets(root: Path, seed: int, n_pretrain: int, n_finetune: int, n_heldout: int) -> TinyDataPaths:
    """Write the pretrain, recipe-1, recipe-2 and held-out splits (JSON + PNG) under `root`.

    Recipe-1 (short answers, like bunny_695k) and recipe-2 (half sentence answers, half short
    ones asked for with `SHORT_ANSWER_PROMPT`, like bunny_llava_1.4m) ask about the same pool
    of images under `finetune/images/train/`; held-out records (short answers, so that an
    exact-match accuracy can score them) use fresh images under `finetune/images/heldout/` and
    text questions that no training record asks.
    """
    check_sizes(n_pretrain, n_finetune, n_heldout)
    scenes = _SceneSource()
    paths = TinyDataPaths.under(root)

    pretrain, pretrain_images = _pretrain_records(random.Random(f"{seed}/pretrain"), scenes, n_pretrain)

    pool_rng = random.Random(f"{seed}/finetune-images")
    pool = [(f"train/{index:05d}.png", scenes.new(pool_rng)) for index in range(image_record_count(n_finetune))]
    recipe1_pool = random.Random(f"{seed}/recipe-1-order").sample(pool, len(pool))
    recipe2_pool = random.Random(f"{seed}/recipe-2-order").sample(pool, len(pool))
    recipe1 = _chat_records(random.Random(f"{seed}/recipe-1"), "recipe1", n_finetune, recipe1_pool, 1.0, set())
    recipe2 = _chat_records(random.Random(f"{seed}/recipe-2"), "recipe2", n_finetune, recipe2_pool, RECIPE2_SHORT_FRACTION, set())

    heldout_rng = random.Random(f"{seed}/heldout")
    heldout_pool = [(f"heldout/{index:05d}.png", scenes.new(heldout_rng))
                    for index in range(image_record_count(n_heldout))]
    seen_text = _text_questions(recipe1) | _text_questions(recipe2)
    heldout = _chat_records(heldout_rng, "heldout", n_heldout, heldout_pool, 1.0, seen_text)

    _save_images(pretrain_images, paths.pretrain_images)
    _save_images(dict(pool), paths.finetune_images)
    _save_images(dict(heldout_pool), paths.finetune_images)
    _write_json(pretrain, paths.pretrain_data)
    _write_json(recipe1, paths.recipe1_data)
    _write_json(recipe2, paths.recipe2_data)
    _write_json(heldout, paths.heldout_data)
    return paths
