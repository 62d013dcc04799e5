"""Completion markers: what is complete, what resumes, what is wiped, what re-runs."""

from __future__ import annotations

import os

import pytest

from flows.config import PipelineConfig, RecipeOverrides, StageData
from flows.markers import StageDir, begin_attempt, completion, mark_complete, read_json, stage_key
from flows.stages import pending_stages, pipeline_jobs, planned_inputs, with_force


def make_output(stage_dir: StageDir, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = stage_dir.output / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_key_follows_settings_and_input_names_sizes_and_mtimes(tmp_path):
    upstream = tmp_path / "up"
    upstream.mkdir()
    (upstream / "w.bin").write_text("a")
    key = stage_key("s", {"lr": 1e-3}, {"up": upstream})
    assert key == stage_key("s", {"lr": 1e-3}, {"up": upstream})
    assert key != stage_key("s", {"lr": 2e-3}, {"up": upstream})
    assert key != stage_key("other", {"lr": 1e-3}, {"up": upstream})
    (upstream / "w.bin").write_text("bb")  # the upstream stage ran again
    assert key != stage_key("s", {"lr": 1e-3}, {"up": upstream})
    (upstream / "w.bin").rename(upstream / "x.bin")
    assert key != stage_key("s", {"lr": 1e-3}, {"up": upstream})


def test_key_reads_no_file_contents_only_their_stat(tmp_path):
    """What the key does not see, by design (stat only, so two million images cost no reads):
    an edit that keeps the size and restores the mtime. A bare `touch` is seen."""
    upstream = tmp_path / "up"
    upstream.mkdir()
    weights = upstream / "w.bin"
    weights.write_text("a")
    key = stage_key("s", {}, {"up": upstream})
    before = weights.stat()
    weights.write_text("b")  # same size, other contents
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert stage_key("s", {}, {"up": upstream}) == key
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000))  # touch
    assert stage_key("s", {}, {"up": upstream}) != key


def test_completion_needs_the_same_key_and_the_output(tmp_path):
    stage = StageDir(tmp_path / "recipe-1")
    assert completion(stage, "k") is None
    make_output(stage, {"adapter.bin": "x"})
    mark_complete(stage, "k", "run-1", {"steps": 3})
    assert completion(stage, "k")["summary"] == {"steps": 3}
    assert completion(stage, "other-key") is None
    assert completion(stage, "k", forced_in_run="run-2") is None  # forced: only this run's completion counts
    assert completion(stage, "k", forced_in_run="run-1") is not None


def test_an_attempt_keeps_checkpoints_only_for_the_same_key(tmp_path):
    stage = StageDir(tmp_path / "recipe-2")
    assert begin_attempt(stage, "k1", "run-1", force=False) is False
    make_output(stage, {"checkpoint-4/trainer_state.json": "{}"})
    assert begin_attempt(stage, "k1", "run-1", force=False) is True  # a retry resumes
    assert (stage.output / "checkpoint-4").is_dir()
    assert read_json(stage.started_marker)["attempts"] == 2
    assert begin_attempt(stage, "k1", "run-2", force=False) is True  # a new run with the same config resumes too
    mark_complete(stage, "k1", "run-2", {})
    assert begin_attempt(stage, "k2", "run-3", force=False) is False  # the config changed: start over
    assert not stage.output.exists() and not stage.complete_marker.exists()


def test_force_starts_over_once_per_flow_run(tmp_path):
    stage = StageDir(tmp_path / "pretrain")
    begin_attempt(stage, "k", "run-1", force=False)
    make_output(stage, {"checkpoint-2/trainer_state.json": "{}"})
    assert begin_attempt(stage, "k", "run-2", force=True) is False
    assert not stage.output.exists()
    make_output(stage, {"checkpoint-2/trainer_state.json": "{}"})
    assert begin_attempt(stage, "k", "run-2", force=True) is True  # the forcing run's own retry resumes


def test_log_files_number_the_attempts(tmp_path):
    stage = StageDir(tmp_path / "s")
    first = stage.next_log()
    first.write_text("1")
    assert first.name == "attempt-1.log" and stage.next_log().name == "attempt-2.log"


def complete_everything(jobs) -> None:
    for name, job in jobs.items():
        make_output(job.dir, {"weights.bin": name})
        mark_complete(job.dir, job.key(planned_inputs(job, jobs)), "run-1", {})


def test_pending_stages_follow_the_dag(tmp_path):
    data = StageData(data_path=tmp_path / "d.json", image_folder=tmp_path)
    config = PipelineConfig.tutorial(
        output_root=tmp_path / "out", llm=tmp_path, vision_tower=tmp_path,
        pretrain_data=data, recipe_1_data=data, recipe_2_data=data,
    )
    jobs = pipeline_jobs(config, {})
    assert pending_stages(jobs, "run-2") == list(jobs)
    complete_everything(jobs)
    assert pending_stages(jobs, "run-2") == []

    weights = jobs["recipe-1"].dir.output / "weights.bin"
    weights.write_text("retrained")
    os.utime(weights, ns=(1, 1))
    assert pending_stages(jobs, "run-2") == ["merge-recipe-1", "average"]

    complete_everything(jobs)
    forced = with_force(pipeline_jobs(config, {}), ["recipe-2"])
    assert pending_stages(forced, "run-2") == ["recipe-2", "merge-recipe-2", "average"]
    assert pending_stages(forced, "run-1") == []  # a retry of the forcing run keeps what it redid


def test_changed_hyperparameters_make_a_stage_and_its_dependents_stale(tmp_path):
    data = StageData(data_path=tmp_path / "d.json", image_folder=tmp_path)
    config = PipelineConfig.tutorial(
        output_root=tmp_path / "out", llm=tmp_path, vision_tower=tmp_path,
        pretrain_data=data, recipe_1_data=data, recipe_2_data=data,
    )
    complete_everything(pipeline_jobs(config, {}))
    changed = config.model_copy(update={"recipes": [
        config.recipes[0].model_copy(update={"overrides": RecipeOverrides(learning_rate=1e-4)}), config.recipes[1]]})
    assert pending_stages(pipeline_jobs(changed, {}), "run-2") == ["recipe-1", "merge-recipe-1", "average"]
    relaunched = config.model_copy(update={"runtime": config.runtime.model_copy(update={"kill_grace_seconds": 1})})
    assert pending_stages(pipeline_jobs(relaunched, {}), "run-2") == []  # launch settings are not in the key


def test_force_names_must_be_stages(tmp_path):
    data = StageData(data_path=tmp_path / "d.json", image_folder=tmp_path)
    config = PipelineConfig.tutorial(
        output_root=tmp_path / "out", llm=tmp_path, vision_tower=tmp_path,
        pretrain_data=data, recipe_1_data=data, recipe_2_data=data,
    )
    with pytest.raises(ValueError, match=r"force: unknown stage\(s\) \['recipe-3'\]; stages are \['pretrain'"):
        with_force(pipeline_jobs(config, {}), ["recipe-3", "average"])
