"""The evaluate stage and the averaging weights chosen on data, in the flow.

Config -> jobs wiring (search replaces the fixed average, the evaluate stage scores every
model on every set), completion keys, validation of the settings, the results table and
preflight. The two stages in a real pipeline run (and a re-run that skips both) are tested
on tests/test_flow_e2e.py's run, which has them on: one pipeline run for both modules.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from conftest import split_heldout
from flows.config import AverageSettings, EvalSet, EvaluateSettings, PipelineConfig
from flows.stages import AVERAGE, EVALUATE, AverageJob, EvaluateJob, SearchAverageJob, pipeline_jobs

MODELS = ["pretrain", "merge-recipe-1", "merge-recipe-2", "average"]


def evaluated_config(tiny_assets, root: Path, search: bool, **demo) -> PipelineConfig:
    validation, test = split_heldout(tiny_assets, root / "eval-data")
    config = PipelineConfig.demo(tiny_assets, root / "out", **demo)
    average = AverageSettings(weights="search", validation=validation, grid=[0.0, 0.3, 1.0]) if search else AverageSettings()
    return config.model_copy(update={"evaluate": EvaluateSettings(sets=[test], batch_size=4, max_new_tokens=8),
                                     "average": average})


def test_no_eval_set_means_no_evaluate_stage_and_the_fixed_average(tiny_assets, tmp_path):
    jobs = pipeline_jobs(PipelineConfig.demo(tiny_assets, tmp_path), {})
    assert EVALUATE not in jobs and type(jobs[AVERAGE]) is AverageJob
    assert jobs[AVERAGE].weights == [0.3, 0.7]


def test_search_config_wires_the_search_and_the_evaluation(tiny_assets, tmp_path):
    config = evaluated_config(tiny_assets, tmp_path, search=True)
    jobs = pipeline_jobs(config, {})
    assert list(jobs)[-2:] == [AVERAGE, EVALUATE]
    search = jobs[AVERAGE]
    assert isinstance(search, SearchAverageJob)
    assert search.upstream == ["merge-recipe-1", "merge-recipe-2"]
    inputs = {name: tmp_path / name / "output" for name in search.upstream}
    command = search.command(inputs)
    assert command[1:3] == ["-m", "bunny.evaluate.search_weights"]
    assert command[3:5] == [str(inputs["merge-recipe-1"]), str(inputs["merge-recipe-2"])]
    flags = dict(zip(command[5::2], command[6::2]))
    assert flags["--data"] == str(tmp_path / "eval-data" / "validation.json")  # never the test split
    assert flags["--output"] == str(config.output_root / "average" / "output")  # the pipeline's output
    assert flags["--inherit-from"] == "1"  # recipe-2's config, as the fixed average
    assert command[command.index("--grid") + 1:] == ["0.0", "0.3", "1.0"]

    evaluate = jobs[EVALUATE]
    assert isinstance(evaluate, EvaluateJob) and evaluate.upstream == MODELS
    assert [s.name for s in evaluate.sets] == ["test", "validation"]  # both numbers reported
    inputs = {name: tmp_path / name / "output" for name in evaluate.upstream}
    commands = evaluate.commands(inputs)
    assert len(commands) == 2
    for command, eval_set in zip(commands, evaluate.sets):
        assert command[1:3] == ["-m", "bunny.evaluate"]
        assert command[3:7] == [str(inputs[m]) for m in MODELS]
        flags = dict(zip(command[7::2], command[8::2]))
        assert flags["--data"] == str(eval_set.data_path)
        assert flags["--model-base"] == str(config.llm)  # puts the pretrain projector on the LLM
        assert flags["--output"] == str(config.output_root / "evaluate" / "output" / eval_set.name)
        assert flags["--batch_size"] == "4" and flags["--max_new_tokens"] == "8"
    loss_only = config.model_copy(update={"evaluate": config.evaluate.model_copy(update={"accuracy": False})})
    assert all("--loss_only" in c for c in pipeline_jobs(loss_only, {})[EVALUATE].commands(inputs))


def test_fixed_weights_with_eval_sets_evaluate_the_fixed_average(tiny_assets, tmp_path):
    jobs = pipeline_jobs(evaluated_config(tiny_assets, tmp_path, search=False), {})
    assert type(jobs[AVERAGE]) is AverageJob and jobs[AVERAGE].weights == [0.3, 0.7]
    assert jobs[EVALUATE].upstream == MODELS and [s.name for s in jobs[EVALUATE].sets] == ["test"]


def test_settings_that_cannot_work_are_refused(tiny_assets, tmp_path):
    config = evaluated_config(tiny_assets, tmp_path, search=True)
    with pytest.raises(ValidationError, match="needs average.validation"):
        AverageSettings(weights="search")
    with pytest.raises(ValidationError, match="must not see a test split"):
        PipelineConfig.model_validate(config.model_dump() | {
            "average": {"weights": "search", "validation": config.evaluate.sets[0].model_dump() | {"name": "v"}}})
    with pytest.raises(ValidationError, match="at least two recipes"):
        PipelineConfig.model_validate(config.model_dump() | {"recipes": [config.recipes[0].model_dump() | {"weight": 1.0}]})
    with pytest.raises(ValidationError, match="must be unique"):
        PipelineConfig.model_validate(config.model_dump() | {
            "evaluate": {"sets": [config.average.validation.model_dump() | {"data_path": tmp_path / "x.json"}]}})
    with pytest.raises(ValidationError, match=r"average.grid"):
        AverageSettings(grid=[0.5, 1.5])


def test_the_evaluation_key_covers_models_data_and_settings(tiny_assets, tmp_path):
    config = evaluated_config(tiny_assets, tmp_path, search=True)
    inputs = {}
    for name in MODELS:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"weights")
        inputs[name] = tmp_path / name
    evaluate, search = pipeline_jobs(config, {})[EVALUATE], pipeline_jobs(config, {})[AVERAGE]
    merged = {name: inputs[name] for name in search.upstream}
    key, search_key = evaluate.key(inputs), search.key(merged)
    assert pipeline_jobs(config, {})[EVALUATE].key(inputs) == key  # stable

    later = config.model_copy(update={"evaluate": config.evaluate.model_copy(update={"timeout_hours": 5.0})})
    assert pipeline_jobs(later, {})[EVALUATE].key(inputs) == key  # how it runs is not what it produces
    tokens = config.model_copy(update={"evaluate": config.evaluate.model_copy(update={"max_new_tokens": 9})})
    assert pipeline_jobs(tokens, {})[EVALUATE].key(inputs) != key
    (tmp_path / "average" / "model.safetensors").write_bytes(b"other weights")  # a model changed
    assert evaluate.key(inputs) != key
    test_file = config.evaluate.sets[0].data_path
    stat = test_file.stat()
    os.utime(test_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the test data changed
    changed = evaluate.key(inputs)
    assert changed != key and search.key(merged) == search_key  # the search never reads the test set
    validation = config.average.validation.data_path
    stat = validation.stat()
    os.utime(validation, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert search.key(merged) != search_key and evaluate.key(inputs) != changed


def test_results_rows_name_models_by_stage(tmp_path):
    from bunny.evaluate import EvalResult, EvalSummary, write_summary
    from flows.evaluation import evaluation_rows, results_table

    job = EvaluateJob(stage=EVALUATE, stage_dir=tmp_path / EVALUATE, upstream=["pretrain", "average"],
                      model_base=tmp_path, sets=[EvalSet(name="test", data_path=tmp_path / "t.json", image_folder=tmp_path)])
    summaries = [EvalSummary("pretrain/output", "t.json", 16, 90, 5.25, 0.0625, 0.5, 0),
                 EvalSummary("average/output", "t.json", 16, 90, 1.5, 0.75, 0.0, 0)]
    write_summary([EvalResult(s, [], 1.0) for s in summaries], job.set_output(job.sets[0]))
    rows = evaluation_rows(job)
    assert [(r["eval set"], r["model"], r["answer loss"], r["accuracy"]) for r in rows] == [
        ("test", "pretrain", 5.25, 0.0625), ("test", "average", 1.5, 0.75)]
    table = results_table(rows).splitlines()
    assert table[0] == "| eval set | model | answer loss | accuracy | empty answers | records | tokens |"
    assert table[2] == "| test | pretrain | 5.2500 | 6.2% | 50.0% | 16 | 90 |"


def test_preflight_checks_the_eval_sets_of_the_stages_to_run(tiny_assets, tmp_path):
    from flows.preflight import run_preflight

    config = evaluated_config(tiny_assets, tmp_path, search=True)
    records = json.loads(config.evaluate.sets[0].data_path.read_text())
    records[1]["conversations"][1]["value"] = " "
    config.evaluate.sets[0].data_path.write_text(json.dumps(records))
    problems = run_preflight(config, ["evaluate"], visible_gpus=[]).problems
    assert len(problems) == 1 and "eval set test" in problems[0] and repr(records[1]["id"]) in problems[0]
    assert "is an empty answer" in problems[0]
    assert run_preflight(config, ["average"], visible_gpus=[]).problems == []  # the search reads validation only
    passed = run_preflight(config, ["average"], visible_gpus=[]).passed
    assert any("eval set validation" in check for check in passed)
