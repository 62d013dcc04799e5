"""bunny.evaluate: the answer loss is the training loss, the normaliser's golden cases, accuracy
and per-record results, determinism, and every refused input named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bunny.data import DataCollator, SupervisedDataset
from bunny.evaluate import (
    EvalDataError,
    EvalSettings,
    answer_losses,
    evaluate_model,
    load_eval_data,
    normalize_answer,
    write_results,
)
from bunny.evaluate.cli import main
from bunny.evaluate.results import model_labels
from bunny.generate import generate_answers, load_model, questions_from_records
from bunny.generate.answers import GenerationSettings
from test_generate import save_tiny_bunny

MAX_NEW_TOKENS = 6


@pytest.fixture(scope="module")
def model_folder(tiny_assets, tmp_path_factory) -> Path:
    return save_tiny_bunny(tiny_assets, tmp_path_factory.mktemp("eval-model") / "model", seed=5)


@pytest.fixture(scope="module")
def loaded(model_folder):
    return load_model(model_folder, device="cpu")


def subset(assets, folder: Path, count: int, edit=None) -> Path:
    records = json.loads(assets.heldout_data.read_text())[:count]
    if edit is not None:
        edit(records)
    path = folder / "heldout.json"
    path.write_text(json.dumps(records))
    return path


def training_loss(loaded, records, data_path, assets) -> torch.Tensor:
    """The loss train.py's model computes in training mode on one batch of ``records``."""
    dataset = SupervisedDataset(data_path, loaded.tokenizer, loaded.image_processor, "phi3",
                                assets.finetune_images, "pad", 256, records=records)
    batch = DataCollator(loaded.tokenizer)([dataset[i] for i in range(len(records))])
    batch.pop("mismatched_ids")
    model = loaded.model.train()
    try:
        with torch.no_grad():
            return model(**batch).loss
    finally:
        model.eval()


def test_answer_loss_equals_the_training_loss_on_the_same_batch(loaded, tiny_assets, tmp_path):
    data = load_eval_data(subset(tiny_assets, tmp_path, 10), tiny_assets.finetune_images)
    rows = answer_losses(loaded, data, batch_size=4)  # batches of mixed lengths
    whole = training_loss(loaded, data.records, data.path, tiny_assets)
    assert sum(r.nll for r in rows) / sum(r.tokens for r in rows) == pytest.approx(whole.item(), rel=1e-5)
    for record, row in zip(data.records, rows):
        alone = training_loss(loaded, [record], data.path, tiny_assets)
        assert row.mean == pytest.approx(alone.item(), rel=1e-5), record["id"]


def test_text_only_records_are_scored_like_training(loaded, tiny_assets, tmp_path):
    def text_only(records):
        for record in records:
            record.pop("image")
            for turn in record["conversations"]:
                turn["value"] = turn["value"].replace("<image>", "").strip()
    data = load_eval_data(subset(tiny_assets, tmp_path, 4, text_only), tiny_assets.finetune_images)
    rows = answer_losses(loaded, data, batch_size=4)
    whole = training_loss(loaded, data.records, data.path, tiny_assets)
    assert sum(r.nll for r in rows) / sum(r.tokens for r in rows) == pytest.approx(whole.item(), rel=1e-5)


@pytest.mark.parametrize(("answer", "normalized"), [
    ("The Circle.", "circle"),
    ("a circle", "circle"),
    ("An apple, a day.", "apple day"),
    ("Two.", "2"),
    ("2.0", "2"),
    ("3.50", "3.5"),
    ("1,000 cats", "1000 cats"),
    ("-2", "-2"),
    ("twenty-one", "21"),
    ("black-and-white", "black and white"),
    ("Don't!", "dont"),
    ("\u201cRed\u201d", "red"),
    ("  ", ""),
    ("...", ""),
    ("The", ""),
])
def test_normalizer_golden_cases(answer, normalized):
    assert normalize_answer(answer) == normalized


def test_accuracy_and_per_record_results(loaded, model_folder, tiny_assets, tmp_path):
    """References set to the model's own greedy answer for half the records, to a wrong word for the
    rest: accuracy must be exactly the share of the first half whose answer is not empty."""
    data = load_eval_data(subset(tiny_assets, tmp_path, 6), tiny_assets.finetune_images)
    questions = questions_from_records(data.records, data.path, data.image_folder)
    own = generate_answers(loaded, questions, GenerationSettings(max_new_tokens=MAX_NEW_TOKENS))
    records = json.loads(json.dumps(data.records))
    for index, record in enumerate(records):
        record["conversations"][1]["value"] = own[index] if index % 2 == 0 and own[index] else "zebra"
    path = tmp_path / "own.json"
    path.write_text(json.dumps(records))
    data = load_eval_data(path, tiny_assets.finetune_images)
    result = evaluate_model(loaded, data, EvalSettings(batch_size=4, max_new_tokens=MAX_NEW_TOKENS), name="m")
    expected_correct = [i % 2 == 0 and bool(normalize_answer(own[i])) for i in range(6)]
    assert [r.correct for r in result.records] == expected_correct
    assert result.summary.accuracy == pytest.approx(sum(expected_correct) / 6)
    assert [r.answer for r in result.records] == own
    assert result.summary.empty_share == pytest.approx(sum(not normalize_answer(a) for a in own) / 6)
    assert result.summary.answer_loss == pytest.approx(sum(r.nll for r in result.records) / result.summary.tokens)

    first = write_results([result], tmp_path / "run1", ["m"])
    again = evaluate_model(loaded, data, EvalSettings(batch_size=2, max_new_tokens=MAX_NEW_TOKENS), name="m")
    second = write_results([again], tmp_path / "run2", ["m"])
    lines = (first / "m" / "records.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == [r["id"] for r in records]
    assert json.loads((first / "m" / "summary.json").read_text())["accuracy"] == result.summary.accuracy
    # determinism, across batch sizes too (losses to float rounding)
    assert [r.answer for r in again.records] == own
    assert again.summary.answer_loss == pytest.approx(result.summary.answer_loss, rel=1e-5)
    assert (first / "summary.md").read_text().splitlines()[2].startswith("| m | ")
    assert (second / "m" / "records.jsonl").is_file()


def test_cli_scores_several_models_and_writes_a_table(model_folder, tiny_assets, tmp_path, capsys):
    data = subset(tiny_assets, tmp_path, 3)
    out = tmp_path / "results"
    assert main([str(model_folder), str(model_folder), "--data", str(data), "--image_folder",
                 str(tiny_assets.finetune_images), "--output", str(out), "--max_new_tokens", "4", "--device", "cpu"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| model | answer loss | accuracy | empty answers |")
    labels = model_labels([model_folder, model_folder])
    summaries = json.loads((out / "summary.json").read_text())
    assert [s["model"] for s in summaries] == labels
    assert summaries[0]["answer_loss"] == summaries[1]["answer_loss"]  # same model, same numbers
    assert all(len((out / label / "records.jsonl").read_text().splitlines()) == 3 for label in labels)


def test_model_labels_tell_same_named_folders_apart(tmp_path):
    assert model_labels([tmp_path / "recipe-1" / "output", tmp_path / "average" / "output"]) == [
        "recipe-1/output", "average/output"]
    assert model_labels([tmp_path / "a", tmp_path / "b"]) == ["a", "b"]


def test_a_record_with_no_answer_is_named(tiny_assets, tmp_path):
    def blank(records):
        records[1]["conversations"][1]["value"] = "  "
        del records[2]["conversations"][1]
    path = subset(tiny_assets, tmp_path, 3, blank)
    with pytest.raises(EvalDataError) as caught:
        load_eval_data(path, tiny_assets.finetune_images)
    problems = "\n".join(caught.value.problems)
    ids = json.loads(path.read_text())
    assert str(caught.value) == f"2 problem(s) in held-out data {path}"
    assert f"record {ids[1]['id']!r} (#1): turn 1 ('gpt') is an empty answer" in caught.value.problems[0]
    # the validation names the record and the missing gpt turn (a human turn where it belongs, or none at the end)
    missing = caught.value.problems[1]
    assert f"record {ids[2]['id']!r} (#2)" in missing and ("expected 'gpt'" in missing or "no gpt answer" in missing)


def test_cli_bad_input_is_one_line_and_exit_2(model_folder, tiny_assets, tmp_path, capsys):
    data = subset(tiny_assets, tmp_path, 2)
    missing = tmp_path / "gone"
    assert main([str(model_folder), str(missing), "--data", str(data), "--image_folder", str(tiny_assets.finetune_images)]) == 2
    assert capsys.readouterr().err == f"bunny-evaluate: error: model folder not found: {missing}\n"
    assert main([str(model_folder), "--data", str(tmp_path / "nope.json")]) == 2
    assert capsys.readouterr().err == f"bunny-evaluate: error: held-out data {tmp_path / 'nope.json'}: no such file\n"
