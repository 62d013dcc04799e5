"""The evaluate stage and the averaging weights chosen on data, in the flow.

Fast: config -> jobs wiring (search replaces the fixed average, the evaluate stage scores
every model on every set), completion keys, validation of the settings, the results table
and preflight. Slow: one pipeline run on the tiny assets with the weight search and the
evaluate stage, then a re-run that skips both.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from flows.config import AverageSettings, EvalSet, EvaluateSettings, GpuSettings, PipelineConfig
from flows.stages import AVERAGE, EVALUATE, AverageJob, EvaluateJob, SearchAverageJob, pipeline_jobs


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


MODELS = ["pretrain", "merge-recipe-1", "merge-recipe-2", "average"]


def split_heldout(tiny_assets, folder: Path) -> tuple[EvalSet, EvalSet]:
    """The tiny held-out file cut in two: a validation split and a test split."""
    records = json.loads(tiny_assets.heldout_data.read_text())
    half = len(records) // 2
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "validation.json").write_text(json.dumps(records[:half]))
    (folder / "test.json").write_text(json.dumps(records[half:]))
    images = tiny_assets.finetune_images
    return (EvalSet(name="validation", data_path=folder / "validation.json", image_folder=images),
            EvalSet(name="test", data_path=folder / "test.json", image_folder=images))


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


# ---- slow: the stages in a real pipeline run --------------------------------------------------

@pytest.fixture(scope="module")
def evaluated_run(tiny_assets, tmp_path_factory):
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import bunny_pipeline

    config = evaluated_config(tiny_assets, tmp_path_factory.mktemp("evaluate"), search=True, steps=2)
    # a free master port: other test sessions on the machine hold deepspeed's default one
    config = config.model_copy(update={"gpus": GpuSettings(master_port=free_port())})
    with prefect_test_harness(server_startup_timeout=120):
        first = bunny_pipeline(config)
        marker = (config.output_root / EVALUATE / "stage-complete.json").read_text()
        second = bunny_pipeline(config)
        from prefect.artifacts import Artifact

        artifacts = {key: Artifact.get(key) for key in
                     ("evaluate-results", "evaluate-report", "average-weight-search", "evaluate-output")}
    return {"config": config, "root": config.output_root, "first": first, "second": second,
            "marker": marker, "artifacts": artifacts}


@pytest.mark.slow
def test_evaluate_stage_publishes_every_model_on_every_set(evaluated_run):
    root, artifacts = evaluated_run["root"], evaluated_run["artifacts"]
    assert [(row["stage"], row["status"]) for row in evaluated_run["first"]][-2:] == [(AVERAGE, "ran"), (EVALUATE, "ran")]
    table = json.loads(artifacts["evaluate-results"].data)
    assert artifacts["evaluate-results"].type == "table"
    assert [(row["eval set"], row["model"]) for row in table] == [(s, m) for s in ("test", "validation") for m in MODELS]
    eval_data = root.parent / "eval-data"
    sizes = {name: len(json.loads((eval_data / f"{name}.json").read_text())) for name in ("test", "validation")}
    assert all(row["records"] == sizes[row["eval set"]] and row["answer loss"] > 0 and 0 <= row["accuracy"] <= 1
               for row in table)
    report = artifacts["evaluate-report"]
    assert report.type == "markdown" and report.data.count("data:image/png;base64,") == 2
    for model in MODELS:
        assert f"| test | {model} |" in report.data
    assert (root / EVALUATE / "answer-loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (root / EVALUATE / "accuracy.png").is_file()
    records = (root / EVALUATE / "output" / "test" / "pretrain" / "output" / "records.jsonl").read_text().splitlines()
    assert len(records) == sizes["test"]


@pytest.mark.slow
def test_the_searched_average_is_the_pipelines_output(evaluated_run):
    from safetensors.torch import load_file

    root = evaluated_run["root"]
    curve = json.loads((root / AVERAGE / "weight-search.json").read_text())
    assert [c["weights"][0] for c in curve["curve"]] == [0.0, 0.3, 1.0]
    best = min(curve["curve"], key=lambda c: c["loss"])
    assert curve["weights"] == best["weights"] and curve["loss"] == best["loss"]
    report = evaluated_run["artifacts"]["average-weight-search"]
    assert report.type == "markdown" and "data:image/png;base64," in report.data
    assert (root / AVERAGE / "weight-search.png").is_file()

    def tensors(stage: str) -> dict[str, torch.Tensor]:
        folder = root / stage / "output"
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        return {k: v for shard in set(index["weight_map"].values()) for k, v in load_file(folder / shard).items()}

    first, second, average = tensors("merge-recipe-1"), tensors("merge-recipe-2"), tensors("average")
    w = curve["weights"][0]
    for name, value in average.items():
        expected = w * first[name].double() + (1 - w) * second[name].double()
        torch.testing.assert_close(value.double(), expected.to(value.dtype).double(), rtol=1e-6, atol=1e-7)
    # the evaluate stage's validation number for the average is the search's own
    table = json.loads(evaluated_run["artifacts"]["evaluate-results"].data)
    scored = next(r for r in table if (r["eval set"], r["model"]) == ("validation", AVERAGE))
    assert scored["answer loss"] == pytest.approx(curve["loss"], rel=1e-3)


@pytest.mark.slow
def test_a_rerun_skips_the_search_and_the_evaluation(evaluated_run):
    assert [row["status"] for row in evaluated_run["second"]] == ["skipped"] * len(evaluated_run["second"])
    assert [row["stage"] for row in evaluated_run["second"]][-1] == EVALUATE
    root = evaluated_run["root"]
    assert (root / EVALUATE / "stage-complete.json").read_text() == evaluated_run["marker"]
    assert sorted(p.name for p in (root / EVALUATE / "logs").iterdir()) == ["attempt-1.log"]
    assert "evaluate output (complete from an earlier run)" == evaluated_run["artifacts"]["evaluate-output"].description
