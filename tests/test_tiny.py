"""Tiny assets: deterministic, reusable, loadable offline, and data that says what the image shows."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoTokenizer,
    SiglipImageProcessor,
    SiglipVisionModel,
)

from bunny.tiny import FORMAT_VERSION, MARKER, TinyAssets, main, make_tiny_assets
from bunny.tiny.data import BACKGROUND_COLORS, COLORS, SHAPE_COLORS, SHAPES, SHORT_ANSWER_PROMPT

SMALL = {"n_pretrain": 12, "n_finetune": 16, "n_heldout": 8}
CAPTION = re.compile(r"^a (small|large) (\w+) (circle|square|triangle) on a (\w+) background\.$")


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> TinyAssets:
    started = time.perf_counter()
    built = make_tiny_assets(tmp_path_factory.mktemp("tiny") / "assets", seed=0)
    seconds = time.perf_counter() - started
    print(f"\nmake_tiny_assets (default sizes) took {seconds:.2f} s")  # a figure, not a check
    return built


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def records(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))


# --- determinism and reuse ------------------------------------------------------------------------

def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path: Path) -> None:
    first = tree_bytes(make_tiny_assets(tmp_path / "a", seed=3, **SMALL).root)
    second = tree_bytes(make_tiny_assets(tmp_path / "b", seed=3, **SMALL).root)
    other = tree_bytes(make_tiny_assets(tmp_path / "c", seed=4, **SMALL).root)
    assert first.keys() == second.keys()
    assert [name for name in first if first[name] != second[name]] == []
    for name in ("finetune/bunny_695k_tiny.json", "pretrain/bunny_pretrain_tiny.json",
                 "llm/model.safetensors", "vision_tower/model.safetensors"):
        assert first[name] != other[name], name
    pngs = [name for name in first if name.endswith(".png") and name in other]
    assert pngs and sum(first[name] != other[name] for name in pngs) > len(pngs) // 2
    assert first["llm/tokenizer.json"] == other["llm/tokenizer.json"]  # the tokenizer does not depend on the seed


def test_reuse_marker_and_force(tmp_path: Path) -> None:
    folder = tmp_path / "assets"
    built = make_tiny_assets(folder, seed=1, **SMALL)
    marker = folder / MARKER
    spec = json.loads(marker.read_text())["spec"]
    assert spec == {"format": FORMAT_VERSION, "seed": 1, **SMALL, "pretrained": False}
    stamp = marker.stat().st_mtime_ns

    assert make_tiny_assets(folder, seed=1, **SMALL) == built
    assert marker.stat().st_mtime_ns == stamp  # reused, not rebuilt

    with pytest.raises(FileExistsError, match="seed"):
        make_tiny_assets(folder, seed=2, **SMALL)
    (folder / "llm" / "config.json").unlink()
    with pytest.raises(FileExistsError, match="llm/config.json"):
        make_tiny_assets(folder, seed=1, **SMALL)

    rebuilt = make_tiny_assets(folder, seed=2, **SMALL, force=True)
    assert json.loads(marker.read_text())["spec"]["seed"] == 2
    assert (rebuilt.llm / "config.json").is_file()
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]  # no temp folders left


def test_assets_of_an_older_format_are_rebuilt(tmp_path: Path) -> None:
    folder = tmp_path / "assets"
    make_tiny_assets(folder, seed=1, **SMALL)
    marker = json.loads((folder / MARKER).read_text())
    marker["spec"]["format"] = FORMAT_VERSION - 1
    (folder / MARKER).write_text(json.dumps(marker))
    (folder / "llm" / "model.safetensors").write_bytes(b"stale")
    rebuilt = make_tiny_assets(folder, seed=1, **SMALL)
    assert json.loads((folder / MARKER).read_text())["spec"]["format"] == FORMAT_VERSION
    assert AutoModelForCausalLM.from_pretrained(rebuilt.llm) is not None
    marker["spec"]["format"] = FORMAT_VERSION + 1  # newer (or foreign) assets are never replaced
    (folder / MARKER).write_text(json.dumps(marker))
    with pytest.raises(FileExistsError, match="force"):
        make_tiny_assets(folder, seed=1, **SMALL)


def test_a_failed_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*args: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr("bunny.tiny.write_tiny_datasets", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        make_tiny_assets(tmp_path / "assets", **SMALL)
    assert list(tmp_path.iterdir()) == []

def test_refuses_foreign_folder_and_bad_sizes(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="force"):
        make_tiny_assets(tmp_path, **SMALL)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="n_heldout"):
        make_tiny_assets(tmp_path / "new", n_heldout=0)
    assert not (tmp_path / "new").exists()


def test_cli_prints_paths(assets: TinyAssets, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(assets.root), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == {name: str(path) for name, path in vars(assets).items()}
    assert main([str(assets.root)]) == 0
    assert f"llm: {assets.llm}" in capsys.readouterr().out
    assert main([str(assets.root), "--seed", "9"]) == 2  # different seed, same folder, no --force
    err = capsys.readouterr().err
    assert err.startswith("bunny-tiny: error: ") and "--force" in err and "Traceback" not in err


# --- models ---------------------------------------------------------------------------------------

def test_llm_and_tokenizer_load_offline_and_run(assets: TinyAssets) -> None:
    config = AutoConfig.from_pretrained(assets.llm)
    tokenizer = AutoTokenizer.from_pretrained(assets.llm)
    model = AutoModelForCausalLM.from_pretrained(assets.llm)
    assert config.model_type == "phi3" and type(model).__name__ == "Phi3ForCausalLM"
    shape = (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.intermediate_size)
    assert shape == (64, 2, 4, 128)
    assert config.vocab_size == len(tokenizer) and not config.tie_word_embeddings
    assert config.max_position_embeddings >= 512
    assert config.eos_token_id == config.pad_token_id == tokenizer.eos_token_id == tokenizer.pad_token_id
    assert tokenizer.eos_token == "<|endoftext|>" and config.bos_token_id == tokenizer.bos_token_id
    assert list((assets.llm).glob("*.safetensors"))

    batch = tokenizer(["USER: What shape is shown? ASSISTANT: A circle.<|endoftext|>"], return_tensors="pt")
    assert batch.input_ids[0, 0].item() == tokenizer.bos_token_id
    with torch.no_grad():
        out = model(**batch, labels=batch.input_ids)
    assert out.logits.shape == (1, batch.input_ids.shape[1], len(tokenizer))
    assert torch.isfinite(out.loss)


def test_assets_stay_small_enough_to_build_in_seconds(assets: TinyAssets) -> None:
    """Build time follows from sizes (machine-independent): parameters, pixels, records."""
    llm = AutoModelForCausalLM.from_pretrained(assets.llm)
    tower = SiglipVisionModel.from_pretrained(assets.vision_tower)
    assert sum(p.numel() for p in llm.parameters()) < 200_000
    assert sum(p.numel() for p in tower.parameters()) < 50_000
    total = sum(path.stat().st_size for path in assets.root.rglob("*") if path.is_file())
    assert total < 8_000_000, total
    pixels = sum(w * h for w, h in (Image.open(p).size for p in assets.root.rglob("*.png")))
    assert pixels < 4_000_000, pixels


def test_llm_output_layer_can_make_an_answer_likely(assets: TinyAssets) -> None:
    """LoRA never trains lm_head or the final norm: a unit-RMS hidden state aimed at a token's
    row must be able to give it most of the probability, as a trained LLM's head can."""
    llm = AutoModelForCausalLM.from_pretrained(assets.llm)
    head = llm.lm_head.weight.detach()
    aimed = head / head.pow(2).mean(dim=1, keepdim=True).sqrt()  # RMS 1, as after the final RMSNorm
    probability = torch.softmax(aimed @ head.T, dim=-1).diagonal()
    assert probability.median() > 0.5, probability.median()  # ~0.75 at std 0.125; 0.006 at HF's 0.02


def test_vision_tower_and_processor_load_offline_and_run(assets: TinyAssets) -> None:
    processor = SiglipImageProcessor.from_pretrained(assets.vision_tower)
    assert type(AutoImageProcessor.from_pretrained(assets.vision_tower)) is type(processor)
    config = AutoConfig.from_pretrained(assets.vision_tower)
    assert config.model_type == "siglip_vision_model"
    assert (config.hidden_size, config.num_hidden_layers, config.image_size, config.patch_size) == (32, 2, 32, 8)
    assert processor.size == {"height": 32, "width": 32} and list(processor.image_mean) == [0.5] * 3

    tower = SiglipVisionModel.from_pretrained(assets.vision_tower)
    image = Image.open(next(assets.pretrain_images.rglob("*.png")))
    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32)
    with torch.no_grad():
        hidden = tower(pixel_values=pixels, output_hidden_states=True).hidden_states
    assert hidden[-2].shape == (1, 16, 32)  # the features Bunny projects: 16 patch tokens


# --- data -----------------------------------------------------------------------------------------

def check_well_formed(rows: list[dict], image_folder: Path) -> None:
    for row in rows:
        turns = row["conversations"]
        assert [turn["from"] for turn in turns] == ["human", "gpt"] * (len(turns) // 2), row["id"]
        assert all(isinstance(turn["value"], str) and turn["value"] for turn in turns), row["id"]
        image_tokens = [turn["value"].count("<image>") for turn in turns]
        if "image" in row:
            assert (image_folder / row["image"]).is_file(), row["id"]
            assert image_tokens[0] == 1 and sum(image_tokens) == 1, row["id"]
        else:
            assert sum(image_tokens) == 0, row["id"]


def test_records_are_well_formed(assets: TinyAssets) -> None:
    pretrain = records(assets.pretrain_data)
    recipe1, recipe2, heldout = (records(assets.recipe1_data), records(assets.recipe2_data),
                                 records(assets.heldout_data))
    assert (len(pretrain), len(recipe1), len(recipe2), len(heldout)) == (128, 128, 128, 96)
    check_well_formed(pretrain, assets.pretrain_images)
    for rows in (recipe1, recipe2, heldout):
        check_well_formed(rows, assets.finetune_images)
        text_only = sum("image" not in row for row in rows)
        assert 0.1 <= text_only / len(rows) <= 0.2
        assert any(len(row["conversations"]) >= 4 and "image" in row for row in rows)
        assert any(len(row["conversations"]) == 2 and "image" in row for row in rows)
    assert all(len(row["conversations"]) == 2 and row["conversations"][0]["value"] == "<image>" for row in pretrain)
    ids = [row["id"] for rows in (pretrain, recipe1, recipe2, heldout) for row in rows]
    assert len(ids) == len(set(ids))

    assert recipe1 != recipe2
    images1 = {row["image"] for row in recipe1 if "image" in row}
    assert images1 == {row["image"] for row in recipe2 if "image" in row}  # one shared image folder
    heldout_images = {row["image"] for row in heldout if "image" in row}
    assert heldout_images and not heldout_images & images1
    trained_questions = {turn["value"] for row in recipe1 + recipe2 for turn in row["conversations"]}
    heldout_questions = {turn["value"] for row in heldout if "image" not in row for turn in row["conversations"][::2]}
    assert heldout_questions and not heldout_questions & trained_questions

    sizes = {Image.open(assets.pretrain_images / row["image"]).size for row in pretrain}
    assert any(width != height for width, height in sizes) and any(width == height for width, height in sizes)


def pixel_truth(path: Path) -> tuple[str, str, str, float]:
    """(shape, colour, background, shape width / image's short side) read back from the pixels alone."""
    image = Image.open(path).convert("RGB")
    counts = image.getcolors()
    assert counts is not None and len(counts) == 2, path  # background + shape, no anti-aliasing
    background = next(name for name, rgb in COLORS.items() if rgb in {rgb for _, rgb in counts})
    shape_count, shape_rgb = next((count, rgb) for count, rgb in counts if rgb != COLORS[background])
    color = min(COLORS, key=lambda name: max(abs(a - b) for a, b in zip(COLORS[name], shape_rgb)))
    assert max(abs(a - b) for a, b in zip(COLORS[color], shape_rgb)) <= 12, path
    rows, columns = (torch.tensor(np.asarray(image)) == torch.tensor(shape_rgb)).all(dim=-1).nonzero().unbind(1)
    width, height = columns.max() - columns.min() + 1, rows.max() - rows.min() + 1
    fill = shape_count / (width * height).item()
    shape = "square" if fill > 0.95 else "circle" if fill > 0.68 else "triangle"
    return shape, color, background, width.item() / min(image.size)


def test_captions_describe_the_pixels(assets: TinyAssets) -> None:
    for row in records(assets.pretrain_data):
        size, color, shape, background = CAPTION.match(row["conversations"][1]["value"]).groups()
        true_shape, true_color, true_background, extent = pixel_truth(assets.pretrain_images / row["image"])
        assert (shape, color, background) == (true_shape, true_color, true_background), row["id"]
        assert (extent >= 0.7) if size == "large" else (extent <= 0.6), row["id"]


def bare_question(text: str) -> str:
    return text.replace("<image>", "").strip().removesuffix(f" {SHORT_ANSWER_PROMPT}")


def test_answers_follow_the_image(assets: TinyAssets) -> None:
    checked = 0
    for path in (assets.recipe1_data, assets.recipe2_data, assets.heldout_data):
        for row in records(path):
            turns = row["conversations"]
            if "image" not in row:
                for question, answer in zip(turns[::2], turns[1::2]):
                    match = re.fullmatch(r"What is (\d+) \+ (\d+)\?", question["value"].removesuffix(f" {SHORT_ANSWER_PROMPT}"))
                    if match:
                        assert answer["value"].endswith(f"{int(match[1]) + int(match[2])}."), row["id"]
                continue
            shape, color, background, _ = pixel_truth(assets.finetune_images / row["image"])
            for question, answer in zip(turns[::2], turns[1::2]):
                asked, said = bare_question(question["value"]), answer["value"].lower()
                if asked.startswith(("What shape", "Name the shape")):
                    assert shape in said, row["id"]
                elif asked.startswith("What color is the") and "background" not in asked:
                    assert color in said, row["id"]
                elif "background" in asked:
                    assert background in said, row["id"]
                elif asked.startswith("Is there a"):
                    assert said.startswith("yes") == (f" {shape} " in asked), row["id"]
                elif asked in ("Describe the image briefly.", "What is in this image?"):
                    assert f"{color} {shape} on a {background} background" in said, row["id"]
                checked += 1
    assert checked > 300



def test_the_question_says_which_answer_style_it_wants(assets: TinyAssets) -> None:
    """Short answers are asked for with the instruction, sentences without it: recipe-1 and the
    held-out split (scored by exact match) are all short, recipe-2 mixes both."""
    def styles(path: Path) -> list[bool]:
        found = []
        for row in records(path):
            turns = row["conversations"]
            for question, answer in zip(turns[::2], turns[1::2]):
                asks_short = question["value"].replace("<image>", "").strip().endswith(SHORT_ANSWER_PROMPT)
                words = answer["value"].split()
                is_short = len(words) <= 2 or words[0] == "A"  # "Red.", "A circle.", "A small red circle on ..."
                assert asks_short == is_short, (row["id"], question["value"], answer["value"])
                found.append(asks_short)
        return found

    assert all(styles(assets.recipe1_data)) and all(styles(assets.heldout_data))
    recipe2 = styles(assets.recipe2_data)
    assert 0.3 < sum(recipe2) / len(recipe2) < 0.7


def test_shapes_are_centred_saturated_on_neutral_backgrounds(assets: TinyAssets) -> None:
    """The layout the demo's learning relies on: a saturated shape over the image's centre on a
    neutral background, so the central patches show the shape and no answer to "what colour
    is the shape" can also be the background's colour."""
    from bunny.tiny.data import Scene
    from bunny.tiny.pretraining import patch_codes

    assert SHAPE_COLORS.keys().isdisjoint(BACKGROUND_COLORS)
    rows = [row for path in (assets.recipe1_data, assets.heldout_data) for row in records(path) if "image" in row]
    for row in rows:
        path = assets.finetune_images / row["image"]
        shape, color, background, _ = pixel_truth(path)
        assert color in SHAPE_COLORS and background in BACKGROUND_COLORS, row["id"]
        image = Image.open(path).convert("RGB")
        mask = (torch.tensor(np.asarray(image)) != torch.tensor(COLORS[background])).any(dim=-1)
        rows_, columns = mask.nonzero().unbind(1)
        centre_x, centre_y = (columns.min() + columns.max()) / 2, (rows_.min() + rows_.max()) / 2
        assert abs(centre_x - (image.width - 1) / 2) <= 2.5 and abs(centre_y - (image.height - 1) / 2) <= 2.5, row["id"]
        assert mask[image.height // 2, image.width // 2], row["id"]  # the centre pixel is the shape's
        left, top = int(columns.min()), int(rows_.min())
        extent = int(columns.max()) - left + 1
        scene = Scene(shape, color, background, "large", image.width, image.height,
                      (left, top, left + extent, top + extent), (0, 0, 0))
        for pad in (False, True):  # as the tower sees it: at least half of the 2x2 central patches show the shape
            centre = [patch_codes(scene, pad=pad, size=32)[i] for i in (5, 6, 9, 10)]
            assert sum(code.startswith(color) for code in centre) >= 2, (row["id"], pad, centre)


def test_colour_and_shape_questions_dominate_and_answers_are_one_token(assets: TinyAssets) -> None:
    """Most image questions ask for the shape or its colour, and every short answer word is one
    token, so a greedy answer names a colour with its first token."""
    from bunny.tiny.data import question_kind

    kinds = [question_kind(row["conversations"][0]["value"]) for path in (assets.recipe1_data, assets.heldout_data)
             for row in records(path) if "image" in row]
    asked = [kind for kind, _ in filter(None, kinds)]
    assert sum(kind in ("colour", "shape") for kind in asked) / len(asked) >= 0.5
    tokenizer = AutoTokenizer.from_pretrained(assets.llm)
    for word in [*SHAPE_COLORS, *BACKGROUND_COLORS, "small", "large"]:
        assert len(tokenizer.tokenize(f"{word.capitalize()}.")) == 2, word  # "▁Red", "."
        assert len(tokenizer(f"USER: Hi ASSISTANT: {word.capitalize()}.", add_special_tokens=False).input_ids) == \
            len(tokenizer("USER: Hi ASSISTANT: A.", add_special_tokens=False).input_ids), word


# --- pretrained assets (the demo's) and the accuracy-per-kind table ----------------------------

def test_patch_codes_mark_where_the_shape_is() -> None:
    from bunny.tiny.data import Scene
    from bunny.tiny.pretraining import patch_codes

    # a red square over the right half of a 64x64 white image: columns 2-3 red, 0-1 white
    scene = Scene("square", "red", "white", "large", 64, 64, (32, 0, 64, 64), (0, 0, 0))
    codes = patch_codes(scene, pad=False, size=32)
    assert [codes[row * 4:(row + 1) * 4] for row in range(4)] == [["white", "white", "red", "red"]] * 4
    # padded to a square (96x48 -> 96x96): the top and bottom rows are the pad canvas, which looks grey
    wide = Scene("square", "blue", "black", "large", 96, 48, (0, 0, 96, 48), (0, 0, 0))
    padded = patch_codes(wide, pad=True, size=32)
    assert padded[:4] == ["grey"] * 4 and padded[-4:] == ["grey"] * 4 and set(padded[4:12]) == {"blue"}
    # a shape over half a patch: a partial code
    half = Scene("square", "red", "white", "small", 64, 64, (0, 0, 8, 16), (0, 0, 0))
    assert patch_codes(half, pad=False, size=32)[0] == "red-part"


def test_tower_features_are_patch_colours() -> None:
    from transformers import SiglipVisionModel

    from bunny.model.vision_tower import VisionTower
    from bunny.tiny.models import tiny_siglip_config
    from bunny.tiny.pretraining import POSITION_SCALE, set_patch_features

    tower = SiglipVisionModel(tiny_siglip_config())
    set_patch_features(tower)
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    features = VisionTower(tower)(pixels)  # [2, 16, 32]: after the first encoder layer
    patches = pixels.reshape(2, 3, 4, 8, 4, 8)
    means = patches.mean(dim=(3, 5)).flatten(2).transpose(1, 2)  # [2, 16, 3]
    top_left = patches[:, :, :, :4, :, :4].mean(dim=(3, 5)).flatten(2).transpose(1, 2)
    assert torch.allclose(features[..., 0:3], 2 * means, atol=1e-5)
    assert torch.allclose(features[..., 3:6], 2 * top_left, atol=1e-5)
    positions = features[..., 15:31] / POSITION_SCALE  # [2, 16 patches, 16]: a one-hot of each patch's index
    assert torch.allclose(positions, torch.eye(16).expand(2, 16, 16), atol=1e-5)
    assert features[..., 31:].abs().max() < 1e-6


def test_llm_pretraining_lowers_the_text_loss() -> None:
    from transformers import Phi3ForCausalLM

    from bunny.tiny.models import tiny_phi3_config
    from bunny.tiny.pretraining import CODE_TOKENS, pretrain_tiny_llm
    from bunny.tiny.tokenizer import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    assert all(len(tokenizer.convert_tokens_to_ids([t])) == 1 and tokenizer.convert_tokens_to_ids(t) != tokenizer.unk_token_id
               for t in CODE_TOKENS.values())
    torch.manual_seed(0)
    model = Phi3ForCausalLM(tiny_phi3_config(tokenizer))
    figures = pretrain_tiny_llm(model, tokenizer, seed=0, size=32, steps=12)
    assert figures["last_loss"] < figures["first_loss"] - 1.0


def test_kind_table_states_chance_and_scores_each_kind() -> None:
    from bunny.tiny.scoring import accuracy_by_kind, chance_by_kind, kind_table

    short = f" {SHORT_ANSWER_PROMPT}"
    records_ = [
        {"question": f"<image>\nWhat color is the shape?{short}", "correct": True},
        {"question": f"What color is the circle?{short}\n<image>", "correct": False},
        {"question": f"<image>\nName the shape in the image.{short}", "correct": True},
        {"question": f"<image>\nWhat color is the background?{short}", "correct": True},
        {"question": f"What is 3 + 4?{short}", "correct": True},  # not an image question: no kind
        {"question": f"<image>\nWhat shape is shown?{short}", "correct": None},  # unscored
    ]
    assert accuracy_by_kind(records_) == {"colour": [True, False], "shape": [True], "background": [True],
                                          "colour+shape": [True, False, True]}
    odds = chance_by_kind(records_)
    assert odds["colour"] == 1 / len(SHAPE_COLORS) and odds["shape"] == 1 / len(SHAPES)
    assert odds["background"] == 1 / len(BACKGROUND_COLORS)
    assert odds["colour+shape"] == pytest.approx((2 / 6 + 2 / 3) / 4)
    table = kind_table({"model-a": records_})
    assert "| chance | 33.3% | 16.7% | 33.3% |" in table and "| model-a | 100.0% | 50.0% | 100.0% | 66.7% |" in table
