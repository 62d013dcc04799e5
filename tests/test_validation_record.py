"""A validation record lets a stage skip decoding images preflight just decoded, and only then."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

import bunny.data.validation as validation
from bunny.data import load_records, validate_dataset
from bunny.data.validation import (
    VALIDATION_RECORD_ENV,
    validation_record_content,
    validation_record_path,
    write_validation_record,
)


def record(record_id: str, image: str) -> dict:
    return {"id": record_id, "image": image,
            "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A square."}]}


@pytest.fixture
def data(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(data file, image folder, a record written for them)."""
    images = tmp_path / "images"
    images.mkdir()
    for index in range(3):
        Image.new("RGB", (8, 8), (index, 2, 3)).save(images / f"{index}.png")
    data_path = tmp_path / "data.json"
    data_path.write_text(json.dumps([record(str(i), f"{i}.png") for i in range(3)]), encoding="utf-8")
    record_path = tmp_path / "record.json"
    write_validation_record(record_path, validation_record_content(data_path, images, load_records(data_path)))
    return data_path, images, record_path


@pytest.fixture
def decoded(monkeypatch) -> list[Path]:
    """The images the validation decodes (a spy on its decoder)."""
    paths: list[Path] = []
    real = validation.load_image

    def spy(path, *args, **kwargs):
        paths.append(Path(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(validation, "load_image", spy)
    return paths


def test_a_matching_record_skips_decoding(data, decoded):
    data_path, images, record_path = data
    records = validate_dataset(data_path, images, "phi3", workers=1, validation_record=record_path)
    assert [r["id"] for r in records] == ["0", "1", "2"]
    assert decoded == []


def test_without_a_record_every_image_is_decoded(data, decoded):
    data_path, images, _ = data
    validate_dataset(data_path, images, "phi3", workers=1)
    assert sorted(p.name for p in decoded) == ["0.png", "1.png", "2.png"]


@pytest.mark.parametrize("change", ["rewritten", "mtime", "replaced"])
def test_a_changed_image_means_full_validation(data, decoded, change):
    data_path, images, record_path = data
    target = images / "1.png"
    if change == "rewritten":
        Image.new("RGB", (9, 9), (9, 9, 9)).save(target)
    elif change == "mtime":
        stat = target.stat()
        os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    else:  # same bytes, same mtime, another file
        copy = images / "copy.png"
        copy.write_bytes(target.read_bytes())
        stat = target.stat()
        os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        os.replace(copy, target)
    validate_dataset(data_path, images, "phi3", workers=1, validation_record=record_path)
    assert sorted(p.name for p in decoded) == ["0.png", "1.png", "2.png"]


def test_an_edited_data_file_means_full_validation(data, decoded):
    data_path, images, record_path = data
    records = json.loads(data_path.read_text())
    records[0]["conversations"][1]["value"] = "A circle."
    data_path.write_text(json.dumps(records), encoding="utf-8")
    validate_dataset(data_path, images, "phi3", workers=1, validation_record=record_path)
    assert len(decoded) == 3


def test_a_record_of_another_data_file_is_ignored(data, decoded, tmp_path):
    data_path, images, record_path = data
    other = tmp_path / "other.json"
    other.write_bytes(data_path.read_bytes())  # the same content, another file
    validate_dataset(other, images, "phi3", workers=1, validation_record=record_path)
    assert len(decoded) == 3


@pytest.mark.parametrize("content", ["not json", "{}", None])
def test_a_missing_or_broken_record_means_full_validation(data, decoded, content):
    data_path, images, record_path = data
    if content is None:
        record_path.unlink()
    else:
        record_path.write_text(content)
    validate_dataset(data_path, images, "phi3", workers=1, validation_record=record_path)
    assert len(decoded) == 3


def test_a_broken_image_behind_a_stale_record_is_still_reported(data):
    data_path, images, record_path = data
    (images / "2.png").write_bytes(b"not an image")
    with pytest.raises(validation.DataValidationError, match="2.png"):
        validate_dataset(data_path, images, "phi3", workers=1, validation_record=record_path)


def test_preflight_writes_the_record_the_training_stages_read(tiny_assets, tmp_path, decoded):
    from flows.config import PipelineConfig
    from flows.preflight import run_preflight
    from flows.stages import pipeline_jobs

    config = PipelineConfig.demo(tiny_assets, tmp_path / "out")
    assert run_preflight(config, ["pretrain", "recipe-1", "recipe-2"], visible_gpus=[]).problems == []
    jobs = pipeline_jobs(config, {})
    for stage, data in [("pretrain", config.pretrain.data), ("recipe-2", config.recipes[1].data)]:
        path = Path(jobs[stage].environment()[VALIDATION_RECORD_ENV])
        assert path == validation_record_path(config.output_root, data.data_path, data.image_folder)
        assert path.is_file()
        decoded.clear()
        validate_dataset(data.data_path, data.image_folder, config.recipe_settings(config.recipes[1]).template()
                         if stage != "pretrain" else "plain", workers=1, validation_record=path)
        assert decoded == [], stage


def test_a_failed_preflight_writes_no_record(tiny_assets, tmp_path):
    from flows.config import PipelineConfig, PreflightSettings
    from flows.preflight import run_preflight

    config = PipelineConfig.demo(tiny_assets, tmp_path / "out")
    config = config.model_copy(update={"preflight": PreflightSettings(workers=1, min_free_gb=10**9)})
    assert run_preflight(config, ["pretrain"], visible_gpus=[]).problems
    assert not (tmp_path / "out").exists()


class _Stop(Exception):
    pass


@pytest.mark.parametrize("record", [None, "record.json"])
def test_train_passes_the_flow_s_record_and_none_by_hand(tiny_assets, tmp_path, monkeypatch, record):
    import bunny.train.train as train
    from test_train_args import base_flags

    seen: dict = {}

    def fake_validate(*args, **kwargs):
        seen.update(kwargs)
        raise _Stop

    monkeypatch.setattr(train, "validate_dataset", fake_validate)
    monkeypatch.delenv(VALIDATION_RECORD_ENV, raising=False)
    if record is not None:
        monkeypatch.setenv(VALIDATION_RECORD_ENV, str(tmp_path / record))
    with pytest.raises(_Stop):
        train.build_trainer(base_flags(tiny_assets, tmp_path))
    assert seen["validation_record"] == (str(tmp_path / record) if record else None)
    assert seen["check_images"] is True
