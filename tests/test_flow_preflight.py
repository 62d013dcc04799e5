"""Preflight: every problem of the stages about to run, reported together."""

from __future__ import annotations

import json
import shutil

from safetensors.torch import load_file

from flows.config import GpuSettings, PipelineConfig, PreflightSettings, StageData
from flows.preflight import PreflightError, expected_output_bytes, run_preflight

ALL_STAGES = ["pretrain", "recipe-1", "recipe-2", "merge-recipe-1", "merge-recipe-2", "average"]


def test_the_tiny_pipeline_passes(tiny_assets, tmp_path):
    config = PipelineConfig.demo(tiny_assets, tmp_path / "out")
    report = run_preflight(config, ALL_STAGES, visible_gpus=[])
    assert report.problems == []
    assert any("CPU path" in check for check in report.passed)
    assert any("records and images" in check and "recipe-2" in check for check in report.passed)


def test_all_problems_come_together(tiny_assets, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(tiny_assets.finetune_images, images)
    records = json.loads(tiny_assets.recipe2_data.read_text())
    with_image = [r for r in records if "image" in r]
    with_image[0]["image"] = "train/missing.png"
    with_image[1]["conversations"][0]["value"] = "no placeholder here"
    (images / with_image[2]["image"]).write_bytes(b"not an image")
    broken_data = tmp_path / "recipe2.json"
    broken_data.write_text(json.dumps(records))

    config = PipelineConfig.demo(tiny_assets, tmp_path / "out")
    recipe_2 = config.recipes[1].model_copy(update={
        "data": StageData(data_path=broken_data, image_folder=images),
        "overrides": config.recipes[1].overrides.model_copy(update={"deepspeed": str(tmp_path / "zero9.json")}),
    })
    config = config.model_copy(update={
        "llm": tmp_path / "no-llm",
        "recipes": [config.recipes[0], recipe_2],
        "gpus": GpuSettings(devices=[3]),
        "preflight": PreflightSettings(workers=2, min_free_gb=10**9),
    })
    report = run_preflight(config, ALL_STAGES, visible_gpus=[])
    text = "\n".join(report.problems)
    assert f"llm {tmp_path / 'no-llm'}: no such folder" in text
    assert f"record '{with_image[0]['id']}'" in text and "missing.png" in text
    assert f"record '{with_image[1]['id']}'" in text
    assert f"record '{with_image[2]['id']}'" in text and "cannot be read" in text
    assert "recipe-2: --deepspeed" in text and "zero9.json" in text
    assert "gpus.devices [3] are not visible" in text
    assert "GB free, the stages to run need about" in text
    markdown = report.markdown(ALL_STAGES)
    assert all(problem in markdown for problem in report.problems)
    error = str(PreflightError(report.problems))
    assert error.startswith(f"preflight found {len(report.problems)} problem(s)") and "zero9.json" in error


def test_only_what_the_pending_stages_need_is_checked(tiny_assets, tmp_path):
    config = PipelineConfig.demo(tiny_assets, tmp_path / "out")
    broken = config.model_copy(update={"pretrain": config.pretrain.model_copy(
        update={"data": StageData(data_path=tmp_path / "gone.json", image_folder=tmp_path)})})
    assert run_preflight(broken, ["average"], visible_gpus=[]).problems == []
    assert run_preflight(broken, [], visible_gpus=[]).passed == []
    problems = run_preflight(broken, ["pretrain"], visible_gpus=[]).problems
    assert problems == [f"pretrain: --data_path {tmp_path / 'gone.json'}: no such file"]


def test_a_missing_image_folder_does_not_hide_a_missing_data_file(tiny_assets, tmp_path):
    config = PipelineConfig.demo(tiny_assets, tmp_path / "out")
    gone = StageData(data_path=tmp_path / "gone.json", image_folder=tmp_path / "no-images")
    broken = config.model_copy(update={"recipes": [r.model_copy(update={"data": gone}) for r in config.recipes]})
    problems = run_preflight(broken, ["recipe-1", "recipe-2"], visible_gpus=[]).problems
    assert problems == [  # both problems, once, naming every stage that reads the data
        f"recipe-1, recipe-2: --image_folder {tmp_path / 'no-images'}: no such folder",
        f"recipe-1, recipe-2: --data_path {tmp_path / 'gone.json'}: no such file",
    ]


def test_records_are_checked_when_the_image_folder_is_missing(tiny_assets, tmp_path):
    records = json.loads(tiny_assets.pretrain_data.read_text())
    records[0]["conversations"] = []
    data = tmp_path / "bad.json"
    data.write_text(json.dumps(records))
    config = PipelineConfig.demo(tiny_assets, tmp_path / "out")
    broken = config.model_copy(update={"pretrain": config.pretrain.model_copy(
        update={"data": StageData(data_path=data, image_folder=tmp_path / "no-images")})})
    problems = run_preflight(broken, ["pretrain"], visible_gpus=[]).problems
    assert problems[0] == f"pretrain: --image_folder {tmp_path / 'no-images'}: no such folder"
    assert len(problems) == 2 and f"record '{records[0]['id']}'" in problems[1]  # not one per image


def test_a_failed_preflight_creates_nothing(tiny_assets, tmp_path):
    config = PipelineConfig.demo(tiny_assets, tmp_path / "runs" / "out")
    broken = config.model_copy(update={"llm": tmp_path / "no-llm"})
    report = run_preflight(broken, ALL_STAGES, visible_gpus=[])
    assert report.problems and any("writable" in check for check in report.passed)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # not even the output root


def test_an_unwritable_output_root_is_reported(tiny_assets, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    config = PipelineConfig.demo(tiny_assets, blocker / "out")
    problems = run_preflight(config, ["average"], visible_gpus=[]).problems
    assert problems == [f"output_root {blocker / 'out'}: {blocker} is not a folder"]


def test_space_estimate_counts_an_unfrozen_tower(tiny_assets, tmp_path):
    config = PipelineConfig.demo(tiny_assets, tmp_path)
    recipe_1, recipe_2 = expected_output_bytes(config, ["recipe-1"]), expected_output_bytes(config, ["recipe-2"])
    assert 0 < recipe_1 < recipe_2
    models = expected_output_bytes(config, ["merge-recipe-1", "merge-recipe-2", "average"])
    params = sum(t.numel() for folder in (tiny_assets.llm, tiny_assets.vision_tower)
                 for t in load_file(folder / "model.safetensors").values())
    assert 3 * 2 * params < models < 3 * 2 * params * 1.5  # three 16-bit models (+ the projector)
    assert expected_output_bytes(config, ALL_STAGES) == (
        expected_output_bytes(config, ["pretrain"]) + recipe_1 + recipe_2 + models)


def test_a_template_whose_stop_string_the_tokenizer_cannot_emit_is_refused(tiny_assets, tmp_path):
    """llama3's stop string is not a token of the tiny Phi-3 tokenizer."""
    config = PipelineConfig.demo(tiny_assets, tmp_path / "out")
    wrong = config.model_copy(update={"recipe_hyperparameters": config.recipe_hyperparameters.model_copy(
        update={"version": "llama3"})})
    problems = run_preflight(wrong, ALL_STAGES, visible_gpus=[]).problems
    assert any("--version 'llama3'" in p and "is not one token of this tokenizer" in p for p in problems), problems
    assert not any("--version" in p for p in run_preflight(config, ALL_STAGES, visible_gpus=[]).problems)


def test_a_corrupt_model_config_is_reported_by_name(tiny_assets, tmp_path):
    llm = tmp_path / "llm"
    shutil.copytree(tiny_assets.llm, llm)
    (llm / "config.json").write_text("{ not json")
    config = PipelineConfig.demo(tiny_assets, tmp_path / "out").model_copy(update={"llm": llm})
    problems = run_preflight(config, ALL_STAGES, visible_gpus=[]).problems
    assert any(p.startswith(f"llm {llm}: config does not load") for p in problems), problems
