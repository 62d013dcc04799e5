"""bunny.generate: answers only (image and text-only), batched like one by one, the CLI, bad input.

Models are tiny random Bunny models saved as full folders (what a merge or an average
writes), so their answers are arbitrary tokens: every check compares with an independent
step-by-step greedy decoding through the model's plain forward, not with fixed strings.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoImageProcessor, AutoTokenizer

from bunny.conversation import generation_prompt, tokenize_prompt
from bunny.data.images import load_image, process_image
from bunny.generate import GenerationSettings, ModelLoadError, Question, generate_answers, load_model
from bunny.generate.cli import main
from bunny.model.builder import build_bunny_model

MAX_NEW_TOKENS = 6


def save_tiny_bunny(assets, folder: Path, seed: int) -> Path:
    """A complete Bunny model folder (weights, config, tokenizer, image processor), random weights."""
    torch.manual_seed(seed)
    model = build_bunny_model(assets.llm, "phi-3", assets.vision_tower, "mlp2x_gelu", dtype=torch.float32)
    model.config.image_aspect_ratio = "pad"
    model.config.tokenizer_model_max_length = 256
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(assets.llm).save_pretrained(folder)
    AutoImageProcessor.from_pretrained(assets.vision_tower).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tiny_assets, tmp_path_factory) -> Path:
    return save_tiny_bunny(tiny_assets, tmp_path_factory.mktemp("bunny-model") / "model", seed=3)


@pytest.fixture(scope="module")
def loaded(tiny_model):
    return load_model(tiny_model, device="cpu")


def heldout_questions(assets, count: int) -> list[Question]:
    records = json.loads(assets.heldout_data.read_text())[:count]
    return [Question(r["id"], r["conversations"][0]["value"], assets.finetune_images / r["image"] if "image" in r else None)
            for r in records]


@torch.no_grad()
def reference_answer(loaded, question: Question, max_new_tokens: int = MAX_NEW_TOKENS) -> str:
    """Greedy decoding one token at a time through the model's forward: no cache, no padding."""
    has_image = question.image is not None
    ids = tokenize_prompt(generation_prompt(question.text, "phi3", has_image), loaded.tokenizer)
    images = None
    if has_image:
        images = process_image(load_image(question.image), loaded.image_processor, "pad").unsqueeze(0)
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = loaded.model(input_ids=torch.tensor([ids + new]), images=images).logits
        token = int(logits[0, -1].argmax())
        if token == loaded.tokenizer.eos_token_id:
            break
        new.append(token)
    return loaded.tokenizer.decode(new, skip_special_tokens=True).strip()


def test_answers_are_the_greedy_continuation_alone_with_and_without_image(loaded, tiny_assets):
    questions = heldout_questions(tiny_assets, 2) + [Question("text-only", "How many letters are in cat?")]
    assert questions[0].image is not None
    answers = generate_answers(loaded, questions, GenerationSettings(max_new_tokens=MAX_NEW_TOKENS), batch_size=3)
    expected = [reference_answer(loaded, q) for q in questions]
    assert answers == expected
    # a batch without any image goes through generate's text-only path, which returns the prompt too
    assert generate_answers(loaded, questions[2:], GenerationSettings(max_new_tokens=MAX_NEW_TOKENS)) == expected[2:]


def test_batched_answers_equal_one_by_one(loaded, tiny_assets):
    questions = heldout_questions(tiny_assets, 5) + [Question("t", "What is red?")]
    settings = GenerationSettings(max_new_tokens=MAX_NEW_TOKENS)
    assert generate_answers(loaded, questions, settings, batch_size=4) == generate_answers(loaded, questions, settings, batch_size=1)


def test_cli_question_prints_the_answer_only(loaded, tiny_model, tiny_assets, capsys):
    question = heldout_questions(tiny_assets, 1)[0]
    assert main([str(tiny_model), "--question", question.text, "--image", str(question.image),
                 "--max_new_tokens", str(MAX_NEW_TOKENS), "--device", "cpu"]) == 0
    assert capsys.readouterr().out == reference_answer(loaded, question) + "\n"


def test_cli_questions_file_writes_jsonl_in_record_order(loaded, tiny_model, tiny_assets, tmp_path):
    records = json.loads(tiny_assets.heldout_data.read_text())[:3]
    records.append({"id": "text", "conversations": [{"from": "human", "value": "Name a colour."}]})  # no answer needed
    questions_file = tmp_path / "questions.json"
    questions_file.write_text(json.dumps(records))
    answers_file = tmp_path / "out" / "answers.jsonl"
    assert main([str(tiny_model), "--questions", str(questions_file), "--image_folder", str(tiny_assets.finetune_images),
                 "--answers", str(answers_file), "--max_new_tokens", str(MAX_NEW_TOKENS), "--batch_size", "2"]) == 0
    rows = [json.loads(line) for line in answers_file.read_text().splitlines()]
    assert [row["id"] for row in rows] == [r["id"] for r in records]
    expected = [reference_answer(loaded, q) for q in heldout_questions(tiny_assets, 3)]
    expected.append(reference_answer(loaded, Question("text", "Name a colour.")))
    assert [row["answer"] for row in rows] == expected
    assert rows[-1]["image"] is None and rows[0]["image"].endswith(records[0]["image"])


def test_sampling_flags_reach_generate_and_are_reproducible(loaded, tiny_assets):
    questions = heldout_questions(tiny_assets, 3)
    sampled = GenerationSettings(max_new_tokens=MAX_NEW_TOKENS, do_sample=True, temperature=5.0, top_k=0, seed=1)
    first = generate_answers(loaded, questions, sampled)
    assert generate_answers(loaded, questions, sampled) == first
    greedy = generate_answers(loaded, questions, GenerationSettings(max_new_tokens=MAX_NEW_TOKENS))
    assert first != greedy  # at temperature 5 over ~600 tokens, sampling all 3 greedy answers is vanishingly unlikely


def test_missing_model_folder_is_one_line_naming_it(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    assert main([str(missing), "--question", "hi"]) == 2
    err = capsys.readouterr().err
    assert err == f"bunny-generate: error: model folder not found: {missing}\n"


def test_a_tokenizer_that_does_not_fit_the_model_is_refused(tiny_model, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(100)])
    tokenizer.save_pretrained(folder)
    with pytest.raises(ModelLoadError, match=rf"model {folder}: mismatched tokenizer: it has {len(tokenizer)} tokens"):
        load_model(folder, device="cpu")


def test_questions_file_problems_name_the_record(tiny_model, tiny_assets, tmp_path, capsys):
    questions_file = tmp_path / "questions.json"
    questions_file.write_text(json.dumps([
        {"id": "fine", "conversations": [{"from": "human", "value": "hi"}]},
        {"id": "empty", "conversations": []},
        {"id": "stray", "conversations": [{"from": "human", "value": "<image>\nwhat?"}]},
    ]))
    assert main([str(tiny_model), "--questions", str(questions_file)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"bunny-generate: error: 2 record(s) of {questions_file} cannot be asked"
    assert "record 'empty' (#1): no question" in err[1] and "record 'stray' (#2)" in err[2]


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # PEFT on transformers 5
def test_a_lora_run_is_merged_on_the_fly(tiny_assets, tmp_path):
    from bunny.merge import merge_lora
    from test_merge import make_run

    run = make_run(tiny_assets, tmp_path / "lora", unfrozen=True, seed=11)
    with pytest.raises(ModelLoadError, match=rf"model {run.folder} is a LoRA run: pass --model-base"):
        load_model(run.folder, device="cpu")
    on_the_fly = load_model(run.folder, model_base=tiny_assets.llm, device="cpu")
    assert not [p for p in run.folder.parent.iterdir() if p.name.startswith("bunny-merge-")]  # scratch removed
    merged = load_model(merge_lora(run.folder, tiny_assets.llm, tmp_path / "merged").output_dir, device="cpu")
    questions = heldout_questions(tiny_assets, 2) + [Question("t", "What is red?")]
    settings = GenerationSettings(max_new_tokens=MAX_NEW_TOKENS)
    assert generate_answers(on_the_fly, questions, settings) == generate_answers(merged, questions, settings)


def test_a_pretrain_output_loads_as_base_llm_plus_its_projector(tiny_assets, tmp_path):
    """What train.py's pretrain stage writes: config.json + mm_projector.bin (projector only)."""
    torch.manual_seed(13)
    model = build_bunny_model(tiny_assets.llm, "phi-3", tiny_assets.vision_tower, "mlp2x_gelu", dtype=torch.float32).eval()
    folder = tmp_path / "pretrain"
    model.config.save_pretrained(folder)
    projector = model.get_model().mm_projector.state_dict()
    torch.save({f"model.mm_projector.{name}": value for name, value in projector.items()}, folder / "mm_projector.bin")
    with pytest.raises(ModelLoadError, match="is a pretrain output"):
        load_model(folder, device="cpu")
    loaded = load_model(folder, model_base=tiny_assets.llm, device="cpu")
    question = heldout_questions(tiny_assets, 1)[0]
    assert generate_answers(loaded, [question], GenerationSettings(max_new_tokens=MAX_NEW_TOKENS)) == [
        reference_answer(type(loaded)(**{**loaded.__dict__, "model": model}), question)]
