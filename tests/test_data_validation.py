"""Each kind of bad data file or record gives a problem that names the file and the record."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from bunny.data import DataValidationError, load_records, validate_dataset, validate_records
from bunny.model.projector import PROJECTOR_TYPES
from conftest import TRAIN_SCRIPT


def chat(question: str, answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(images / "ok.png")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return images


def good(record_id: str = "good", image: str | None = "ok.png") -> dict:
    record: dict = {"id": record_id, "conversations": chat("<image>\nWhat is it?" if image else "Hi", "A square.")}
    if image:
        record["image"] = image
    return record


def problems_of(tmp_path: Path, folder: Path, records: list, template: str = "phi3", **kwargs) -> list[str]:
    data_path = tmp_path / "data.json"
    data_path.write_text(json.dumps(records), encoding="utf-8")
    with pytest.raises(DataValidationError) as caught:
        validate_dataset(data_path, folder, template, **kwargs)
    message = str(caught.value)
    assert str(data_path) in message
    return [str(problem) for problem in caught.value.problems]


def single(tmp_path: Path, folder: Path, record, template: str = "phi3", **kwargs) -> str:
    """The one problem of [good record, `record`], checked to name the file and record #1."""
    problems = problems_of(tmp_path, folder, [good(), record], template, **kwargs)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{tmp_path / 'data.json'}: record ")
    assert "(#1)" in problems[0] or "record #1 (no id)" in problems[0]
    return problems[0]


def test_clean_file_returns_its_records(tmp_path, folder):
    two_rounds = chat("Look.\n<image>", "Yes.") + chat("Sure?", "Yes.")
    records = [good(), good("text", image=None), {"id": 7, "image": "ok.png", "conversations": two_rounds}]
    data_path = tmp_path / "data.json"
    data_path.write_text(json.dumps(records), encoding="utf-8")
    seen: list[tuple[int, int]] = []
    returned = validate_dataset(data_path, folder, "phi3", progress=lambda done, total: seen.append((done, total)))
    assert returned == records
    assert seen[-1] == (4, 4)  # 3 records + 1 distinct image


def test_record_without_id(tmp_path, folder):
    record = good()
    del record["id"]
    assert "record #1 (no id): has no 'id'" in single(tmp_path, folder, record)


def test_record_without_conversations(tmp_path, folder):
    assert "record 'x' (#1): has no 'conversations'" in single(tmp_path, folder, {"id": "x", "image": "ok.png"})


def test_record_that_is_not_an_object(tmp_path, folder):
    problem = single(tmp_path, folder, ["not", "a", "record"])
    assert "record #1 (no id): must be a JSON object, got a JSON array" in problem


def test_unknown_role(tmp_path, folder):
    record = {"id": "r", "conversations": [{"from": "system", "value": "Be nice."}] + chat("Hi", "Hello.")[1:]}
    assert "record 'r' (#1): turn 0 has unknown role 'system'" in single(tmp_path, folder, record)


def test_turns_out_of_order(tmp_path, folder):
    record = {"id": "o", "conversations": chat("Hi", "Hello.")[::-1]}
    assert "record 'o' (#1): turn 0 is from 'gpt', expected 'human'" in single(tmp_path, folder, record)


def test_conversation_ending_with_a_question(tmp_path, folder):
    record = {"id": "q", "conversations": chat("Hi", "Hello.") + [{"from": "human", "value": "Bye?"}]}
    assert "record 'q' (#1): the last turn is a human turn" in single(tmp_path, folder, record)


def test_missing_image_file(tmp_path, folder):
    problem = single(tmp_path, folder, good("m", "nowhere/missing.png"))
    assert "record 'm' (#1): image file" in problem and "missing.png not found" in problem


def test_unreadable_image_file(tmp_path, folder):
    problem = single(tmp_path, folder, good("b", "broken.png"))
    assert "record 'b' (#1): image file" in problem and "broken.png cannot be read" in problem


def test_truncated_jpeg_is_caught(tmp_path, folder):
    """PIL's verify() passes a truncated JPEG; only a full decode (what training does) fails it."""
    gradient = Image.linear_gradient("L").resize((64, 64)).convert("RGB")
    gradient.save(folder / "whole.jpg", quality=90)
    data = (folder / "whole.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(data[: len(data) * 2 // 3])
    with Image.open(folder / "cut.jpg") as cut:
        cut.verify()  # the old check: passes
    assert single(tmp_path, folder, good("j", "cut.jpg")).count("cut.jpg cannot be read") == 1
    assert validate_records([good("w", "whole.jpg")], tmp_path / "data.json", folder, "phi3") == []


def test_wide_range_images(tmp_path, folder):
    """16-bit images validate (they are scaled); 32-bit integer and float ones are refused by name."""
    Image.new("I;16", (8, 8), 40000).save(folder / "deep.png")
    Image.new("I", (8, 8), 70000).save(folder / "int32.tif")
    Image.new("F", (8, 8), 0.5).save(folder / "float.tif")
    assert validate_records([good("d", "deep.png")], tmp_path / "data.json", folder, "phi3") == []
    assert "record 'i' (#1): image file" in single(tmp_path, folder, good("i", "int32.tif"))
    assert "PIL mode I) has no defined range" in single(tmp_path, folder, good("i", "int32.tif"))
    assert "PIL mode F) has no defined range" in single(tmp_path, folder, good("f", "float.tif"))


@pytest.mark.parametrize("answer", ["", "  \n "])
def test_empty_answer_is_refused(tmp_path, folder, answer):
    record = {"id": "e", "conversations": chat("Hi", "Hello.") + chat("And?", answer)}
    problem = single(tmp_path, folder, record)
    assert "record 'e' (#1): turn 3 ('gpt') is an empty answer" in problem


def test_empty_question_is_refused_but_a_lone_image_is_a_question(tmp_path, folder):
    record = {"id": "q", "conversations": chat("", "Hello.")}
    assert "record 'q' (#1): turn 0 ('human') is an empty question" in single(tmp_path, folder, record)
    lone_image = {"id": "cap", "image": "ok.png", "conversations": chat("<image>", "A caption.")}
    assert validate_records([lone_image], tmp_path / "data.json", folder, "plain") == []


def test_image_path_escaping_the_folder(tmp_path, folder):
    problem = single(tmp_path, folder, good("e", "../data.json"))
    assert "record 'e' (#1): image path '../data.json' escapes --image_folder" in problem
    problem = single(tmp_path, folder, good("e2", "sub/../../images/ok.png"))
    assert "escapes --image_folder" in problem


def test_absolute_image_path(tmp_path, folder):
    problem = single(tmp_path, folder, good("a", str(folder / "ok.png")))
    assert "record 'a' (#1): image path" in problem and "is absolute" in problem


def test_more_than_one_placeholder(tmp_path, folder):
    record = {"id": "two", "image": "ok.png", "conversations": chat("<image>\n<image>\nCompare.", "Same.")}
    assert "record 'two' (#1): holds 2 <image> placeholders" in single(tmp_path, folder, record)


def test_image_record_needs_placeholder_in_first_human_turn(tmp_path, folder):
    record = {"id": "late", "image": "ok.png", "conversations": chat("Hi", "Hello.") + chat("<image>\nThis?", "Yes.")}
    assert "record 'late' (#1): its <image> is in turn 2" in single(tmp_path, folder, record)
    record = {"id": "none", "image": "ok.png", "conversations": chat("Hi", "Hello.")}
    assert "record 'none' (#1): has an 'image' but no <image>" in single(tmp_path, folder, record)


def test_text_only_record_with_placeholder(tmp_path, folder):
    record = {"id": "t", "conversations": chat("<image>\nHi", "Hello.")}
    assert "record 't' (#1): holds <image> but has no 'image' field" in single(tmp_path, folder, record)


def test_plain_needs_exactly_one_exchange(tmp_path, folder):
    record = {"id": "p", "image": "ok.png", "conversations": chat("<image>", "A square.") + chat("More?", "No.")}
    assert "record 'p' (#1): the plain template takes one human and one gpt turn" in single(
        tmp_path, folder, record, "plain")


def test_image_without_image_folder(tmp_path):
    data_path = tmp_path / "data.json"
    data_path.write_text(json.dumps([good("n")]), encoding="utf-8")
    with pytest.raises(DataValidationError, match=r"^1 problem in --data_path"):
        validate_dataset(data_path, None, "phi3")
    problems = problems_of(tmp_path, None, [good("n")])
    expected = f"{tmp_path / 'data.json'}: record 'n' (#0): has image 'ok.png' but no --image_folder was given"
    assert problems == [expected]


def test_all_problems_listed_and_message_truncated(tmp_path, folder):
    records = [{"id": f"bad-{i}", "image": "missing.png", "conversations": chat("Hi", "Hello.")} for i in range(60)]
    data_path = tmp_path / "data.json"
    data_path.write_text(json.dumps(records), encoding="utf-8")
    with pytest.raises(DataValidationError) as caught:
        validate_dataset(data_path, folder, "phi3")
    assert len(caught.value.problems) == 120  # each record: no <image>, and a missing file
    message = str(caught.value)
    assert message.startswith(f"120 problems in --data_path {data_path}:")
    assert "record 'bad-24'" in message and "record 'bad-25'" not in message
    assert message.endswith("... and 70 more problems")


def test_many_images_checked_in_threads(tmp_path, folder):
    for i in range(70):
        Image.new("RGB", (4, 4), (i, i, i)).save(folder / f"img{i}.png")
    records = [good(f"r{i}", f"img{i}.png") for i in range(70)] + [good("bad", "broken.png")]
    problems = validate_records(records, tmp_path / "data.json", folder, "phi3", workers=4)
    assert [problem.record_id for problem in problems] == ["bad"]
    assert validate_records(records, tmp_path / "data.json", folder, "phi3", check_images=False) == []


def test_unknown_template_names_version(tmp_path, folder):
    with pytest.raises(ValueError, match="--version 'vicuna'"):
        validate_records([good()], tmp_path / "data.json", folder, "vicuna")


def test_load_records_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--data_path .*absent.json: no such file"):
        load_records(tmp_path / "absent.json")
    broken = tmp_path / "broken.json"
    broken.write_text("[{]", encoding="utf-8")
    with pytest.raises(ValueError, match=r"--data_path .*broken.json: not valid JSON"):
        load_records(broken)
    mapping = tmp_path / "mapping.json"
    mapping.write_text('{"id": 1}', encoding="utf-8")
    with pytest.raises(ValueError, match=r"--data_path .*mapping.json: expected a JSON list of records, got a JSON o"):
        load_records(mapping)


def _train_cli(tmp_path: Path, assets, data_path: Path, *flags: str, debug: bool = False):
    """train.py as a command; validation runs before any model loads (the tokenizer and image
    processor load first, for the template check)."""
    env = {k: v for k, v in os.environ.items() if k != "BUNNY_DEBUG"} | ({"BUNNY_DEBUG": "1"} if debug else {})
    command = [sys.executable, str(TRAIN_SCRIPT), "--model_name_or_path", str(assets.llm), "--vision_tower",
               str(assets.vision_tower), "--data_path", str(data_path), "--output_dir", str(tmp_path / "out"), *flags]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def test_train_reports_bad_data_in_lines_without_traceback(tmp_path, folder, tiny_assets):
    data_path = tmp_path / "data.json"
    data_path.write_text(json.dumps([good(), good("gone", "missing.png"), {"id": "e", "conversations": chat("Hi", "")}]))
    result = _train_cli(tmp_path, tiny_assets, data_path, "--image_folder", str(folder))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0] == f"train: error: 2 problems in --data_path {data_path}"
    assert lines[1].startswith(f"  - {data_path}: record 'gone' (#1): image file") and "missing.png" in lines[1]
    assert lines[2] == f"  - {data_path}: record 'e' (#2): turn 1 ('gpt') is an empty answer: " \
                       "it would train only the end-of-text token"
    assert not (tmp_path / "out").exists()


def test_train_bad_flag_is_one_line_and_bunny_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    from bunny.cli import UserError
    from bunny.train.train import main as train_main

    data_path = tmp_path / "data.json"
    data_path.write_text(json.dumps([good(image=None)]))
    argv = ["--model_name_or_path", str(tmp_path), "--vision_tower", str(tmp_path), "--data_path", str(data_path),
            "--output_dir", str(tmp_path / "out"), "--mm_projector_type", "mlp9"]
    monkeypatch.delenv("BUNNY_DEBUG", raising=False)
    assert train_main(argv) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"train: error: unknown --mm_projector_type 'mlp9'; known: {', '.join(PROJECTOR_TYPES)}"]
    monkeypatch.setenv("BUNNY_DEBUG", "1")
    with pytest.raises(UserError, match="--mm_projector_type 'mlp9'"):
        train_main(argv)
