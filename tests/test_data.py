"""Dataset items, collator batches, image modes and length grouping on tiny synthetic data."""

from __future__ import annotations

import json
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from bunny.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from bunny.data import (
    DataCollator,
    ModalityLengthGroupedSampler,
    SupervisedDataset,
    expand_to_square,
    load_image,
    modality_length_grouped_indices,
    process_image,
)
from bunny.data.images import pad_colour, to_rgb
from bunny.tiny.tokenizer import build_tiny_tokenizer

try:  # transformers 5 names the PIL backend apart; it behaves like SiglipImageProcessor
    from transformers import SiglipImageProcessorPil as ImageProcessor
except ImportError:  # pragma: no cover - transformers 4.x
    from transformers import SiglipImageProcessor as ImageProcessor

MEAN = (0.2, 0.4, 0.6)
SIDE = 16


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(add_bos=True)


@pytest.fixture(scope="module")
def image_processor():
    return ImageProcessor(size={"height": SIDE, "width": SIDE}, image_mean=list(MEAN), image_std=[0.5, 0.5, 0.5])


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 20), (255, 0, 0)).save(folder / "wide.png")
    Image.new("RGB", (20, 40), (0, 255, 0)).save(folder / "sub" / "tall.png")
    Image.new("RGBA", (24, 24), (0, 0, 255, 128)).save(folder / "square.png")
    return folder


def chat(question: str, answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def write(tmp_path: Path, records: list[dict]) -> Path:
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


PHI3_RECORDS = [
    {"id": "img-0", "image": "wide.png", "conversations": chat("<image>\nWhat color is the shape?", "Red.")},
    {"id": "txt-1", "conversations": chat("What is 2 + 3?", "5.")
     + chat("And 1 + 1?", "2, which is a small number.")},
    {"id": "img-2", "image": "sub/tall.png", "conversations": chat("What is it?\n<image>", "A green square.")},
]


def make_dataset(tmp_path, tokenizer, image_processor, image_folder, records=PHI3_RECORDS, template="phi3",
                 aspect="pad", max_length=256) -> SupervisedDataset:
    return SupervisedDataset(write(tmp_path, records), tokenizer, image_processor, template, image_folder,
                             aspect, max_length)


def test_phi3_items(tmp_path, tokenizer, image_processor, image_folder):
    dataset = make_dataset(tmp_path, tokenizer, image_processor, image_folder)
    assert len(dataset) == 3
    image_item, text_item = dataset[0], dataset[1]
    assert image_item["id"] == "img-0" and text_item["id"] == "txt-1"
    assert image_item["input_ids"].dtype == torch.long and image_item["labels"].shape == image_item["input_ids"].shape
    assert (image_item["input_ids"] == IMAGE_TOKEN_INDEX).sum() == 1
    assert (text_item["input_ids"] == IMAGE_TOKEN_INDEX).sum() == 0
    assert image_item["pixel_values"].shape == (3, SIDE, SIDE) and image_item["pixel_values"].dtype == torch.float32
    assert text_item["pixel_values"] is None
    assert not image_item["mismatch"] and not text_item["mismatch"]
    trained = image_item["labels"][image_item["labels"] != IGNORE_INDEX].tolist()
    assert tokenizer.decode(trained) == "Red.<|endoftext|>"


def test_plain_item_and_truncation(tmp_path, tokenizer, image_processor, image_folder):
    caption = "a blue square on a red background."
    records = [{"id": "cap", "image": "square.png", "conversations": chat("<image>", caption)}]
    item = make_dataset(tmp_path, tokenizer, image_processor, image_folder, records, "plain", "square")[0]
    assert item["input_ids"][:2].tolist() == [tokenizer.bos_token_id, IMAGE_TOKEN_INDEX]
    assert tokenizer.decode(item["labels"][2:].tolist()) == caption + "\n"
    short = make_dataset(tmp_path, tokenizer, image_processor, image_folder, records, "plain", "square", 4)[0]
    assert short["input_ids"].tolist() == item["input_ids"][:4].tolist()


def test_pad_fills_with_processor_mean_and_square_stretches(image_processor, image_folder):
    wide = load_image(image_folder / "wide.png")  # 40x20 red: pad adds rows above and below
    assert wide.mode == "RGB" and load_image(image_folder / "square.png").mode == "RGB"
    padded = process_image(wide, image_processor, "pad")
    stretched = process_image(wide, image_processor, "square")
    assert padded.shape == stretched.shape == (3, SIDE, SIDE)
    assert padded[:, 0, :].abs().max() < 0.01  # the mean colour normalizes to zero
    assert padded[:, SIDE // 2, :].abs().max() > 0.5  # the red image in the middle
    expected_red = torch.tensor([(1.0 - MEAN[0]) / 0.5, (0.0 - MEAN[1]) / 0.5, (0.0 - MEAN[2]) / 0.5])
    assert torch.allclose(stretched[:, 0, 0], expected_red, atol=0.01)  # no padding anywhere
    canvas = expand_to_square(wide, (51, 102, 153))
    assert canvas.size == (40, 40) and canvas.getpixel((0, 0)) == (51, 102, 153)
    assert canvas.getpixel((20, 20)) == (255, 0, 0)


def test_pad_colour_truncates_the_mean_like_bunny(image_processor):
    """Bunny fills with int(mean * 255): 127 for a 0.5 mean (rounding would give 128)."""
    half = ImageProcessor(size={"height": SIDE, "width": SIDE}, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    assert pad_colour(half) == (127, 127, 127)
    assert pad_colour(image_processor) == (51, 102, 153)  # 0.2 * 255 = 51.0000...01: exact values stay
    clip = ImageProcessor(image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[1, 1, 1])
    assert pad_colour(clip) == (122, 116, 104)
    padded = process_image(Image.new("RGB", (32, 16), (255, 0, 0)), half, "pad")
    assert torch.allclose(padded[:, 0, :], torch.full((3, SIDE), (127 / 255 - 0.5) / 0.5), atol=1e-6)


def test_sixteen_bit_gradient_is_scaled_not_clipped(tmp_path):
    """A 0-65535 ramp becomes a 0-255 ramp (PIL's convert("RGB") makes 99.6% of it white)."""
    ramp = np.linspace(0, 65535, 1024).round().astype(np.uint16).reshape(4, 256)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    with Image.open(tmp_path / "ramp.png") as opened:
        assert opened.mode == "I;16"
    rgb = np.asarray(load_image(tmp_path / "ramp.png"))
    assert rgb.shape == (4, 256, 3) and rgb.dtype == np.uint8
    expected = np.floor(ramp.astype(np.float64) * 255 / 65535 + 0.5)  # nearest 8-bit level, independently
    assert np.array_equal(rgb[..., 0], expected) and np.array_equal(rgb[..., 1], rgb[..., 2])
    assert (rgb == 255).mean() < 0.01 and rgb.min() == 0
    big_endian = Image.frombytes("I;16B", (256, 4), ramp.astype(">u2").tobytes())
    assert np.array_equal(np.asarray(to_rgb(big_endian))[..., 0], expected)


def test_alpha_is_dropped_like_the_original(image_folder, tmp_path):
    """RGBA keeps the colour stored under each pixel, as PIL's convert("RGB") in Bunny does."""
    rgba = Image.new("RGBA", (2, 1), (10, 20, 30, 0))
    rgba.putpixel((1, 0), (200, 100, 50, 128))
    rgba.save(tmp_path / "alpha.png")
    loaded = load_image(tmp_path / "alpha.png")
    assert [loaded.getpixel((0, 0)), loaded.getpixel((1, 0))] == [(10, 20, 30), (200, 100, 50)]
    assert load_image(image_folder / "square.png").getpixel((0, 0)) == (0, 0, 255)


def test_unknown_aspect_ratio_names_the_flag(tmp_path, tokenizer, image_processor, image_folder):
    with pytest.raises(ValueError, match="--image_aspect_ratio 'anyres'"):
        process_image(load_image(image_folder / "wide.png"), image_processor, "anyres")
    with pytest.raises(ValueError, match="--image_aspect_ratio"):
        make_dataset(tmp_path, tokenizer, image_processor, image_folder, aspect="anyres")


def test_item_error_names_record(tmp_path, tokenizer, image_processor, image_folder):
    records = [{"id": "gone", "image": "missing.png", "conversations": chat("<image>\nHi", "Hello.")}]
    dataset = make_dataset(tmp_path, tokenizer, image_processor, image_folder, records)
    with pytest.raises(ValueError, match=r"data.json: record 'gone' \(#0\): cannot read image file .*missing.png"):
        dataset[0]


def test_lengths_estimate_words_and_sign_modality(tmp_path, tokenizer, image_processor, image_folder):
    dataset = make_dataset(tmp_path, tokenizer, image_processor, image_folder)
    assert dataset.modality_lengths == [7, -16, 7]
    assert dataset.lengths == [7 + 128, 16, 7 + 128]


def test_records_can_be_handed_over(tmp_path, tokenizer, image_processor, image_folder):
    dataset = SupervisedDataset(tmp_path / "never-read.json", tokenizer, image_processor, "phi3", image_folder, "pad",
                                64, records=PHI3_RECORDS)
    assert dataset[1]["id"] == "txt-1"


def test_collator_batch(tmp_path, tokenizer, image_processor, image_folder):
    dataset = make_dataset(tmp_path, tokenizer, image_processor, image_folder)
    items = [dataset[1], dataset[0], dataset[2]]
    items[2] = {**items[2], "mismatch": True}
    batch = DataCollator(tokenizer)(items)
    lengths = [len(item["input_ids"]) for item in items]
    assert set(batch) == {"input_ids", "labels", "attention_mask", "images", "mismatched_ids"}
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, max(lengths))
    assert batch["attention_mask"].dtype == torch.bool
    for row, (item, length) in enumerate(zip(items, lengths)):
        assert batch["input_ids"][row, :length].tolist() == item["input_ids"].tolist()
        assert (batch["input_ids"][row, length:] == tokenizer.pad_token_id).all()
        assert (batch["labels"][row, length:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][row].tolist() == [True] * length + [False] * (max(lengths) - length)
    assert torch.equal(batch["images"], torch.stack([items[1]["pixel_values"], items[2]["pixel_values"]]))
    assert batch["mismatched_ids"] == ["img-2"]
    text_only = DataCollator(tokenizer)([dataset[1]])
    assert "images" not in text_only and text_only["mismatched_ids"] == []


def test_dataloader_workers_and_pickling(tmp_path, tokenizer, image_processor, image_folder):
    dataset = make_dataset(tmp_path, tokenizer, image_processor, image_folder)
    assert pickle.loads(pickle.dumps(dataset))[0]["id"] == "img-0"
    loader = DataLoader(dataset, batch_size=3, num_workers=1, collate_fn=DataCollator(tokenizer))
    (batch,) = list(loader)
    assert batch["images"].shape == (2, 3, SIDE, SIDE) and batch["input_ids"].shape[0] == 3


def batches(order: list[int], size: int) -> list[list[int]]:
    return [order[start:start + size] for start in range(0, len(order), size)]


def _long_counts_per_rank(megabatch: list[int], lengths: list[int], batch_size: int) -> list[int]:
    return [sum(abs(lengths[i]) == 100 for i in rank) for rank in batches(megabatch, batch_size)]


def test_sampler_groups_modalities_and_balances_lengths_across_ranks():
    """Each full megabatch is one modality, and its long samples are spread evenly over the ranks.

    Lengths are 1 or 100, so a balanced deal gives every rank the same number of long samples,
    give or take one; an undealt megabatch (the shuffled order cut in rank-sized pieces) does
    not, which the test checks too, so it cannot pass without the balancing.
    """
    generator = torch.Generator().manual_seed(1)
    magnitudes = torch.where(torch.rand(400, generator=generator) < 0.3, 100, 1).tolist()
    signs = torch.where(torch.rand(400, generator=generator) < 0.6, 1, -1).tolist()
    lengths = [m * s for m, s in zip(magnitudes, signs)]
    batch_size, world_size = 4, 4
    order = modality_length_grouped_indices(lengths, batch_size, world_size, torch.Generator().manual_seed(0))
    assert sorted(order) == list(range(400))
    images, texts = sum(length > 0 for length in lengths), sum(length < 0 for length in lengths)
    step = batch_size * world_size
    full = (images // step + texts // step) * step  # samples in full megabatches
    megabatches = batches(order[:full], step)
    assert len(megabatches) >= 20
    for megabatch in megabatches:
        assert len({lengths[i] > 0 for i in megabatch}) == 1  # one modality per optimizer step
        counts = _long_counts_per_rank(megabatch, lengths, batch_size)
        assert max(counts) - min(counts) <= 1, counts
        ranks = batches(megabatch, batch_size)  # each rank's batch is dealt longest first
        assert all([abs(lengths[i]) for i in rank] == sorted((abs(lengths[i]) for i in rank), reverse=True)
                   for rank in ranks)
    # The same megabatches cut without dealing would be unbalanced somewhere: the check has teeth.
    shuffled = [sorted(m, key=lambda i: torch.rand(1, generator=generator).item()) for m in megabatches]
    assert any(max(c) - min(c) > 1 for c in (_long_counts_per_rank(m, lengths, batch_size) for m in shuffled))
    assert Counter(lengths[i] > 0 for i in order[full:]) == Counter({True: images % step, False: texts % step})


def test_sampler_is_deterministic_per_seed_and_epoch():
    lengths = [(i % 5 + 1) * (1 if i % 4 else -1) for i in range(40)]
    sampler = ModalityLengthGroupedSampler(lengths, batch_size=4, world_size=1, seed=3)
    first = list(sampler)
    assert first == list(ModalityLengthGroupedSampler(lengths, batch_size=4, world_size=1, seed=3))
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first and sorted(second) == sorted(first) == list(range(40)) and len(sampler) == 40
    assert list(ModalityLengthGroupedSampler(lengths, batch_size=4, seed=4)) != first
