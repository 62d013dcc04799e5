"""The whole flow on the tiny assets on the session's Prefect server, real deepspeed launches.

One module-scoped run of every stage, the averaging-weight search and the evaluate stage
included: recipe-2 is made to fail once right after its checkpoint-4 (train.py's fault hook)
and retried; then that flow run is retried through Prefect's CLI, and a new run with the same
config follows. (tests/test_flow_evaluate.py tests the evaluate stage's wiring without a run.)
A separate run is stopped the way a Prefect worker cancels one (SIGTERM to the flow process)
while it trains.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import split_heldout
from flows.config import AverageSettings, EvaluateSettings, LaunchSettings, PipelineConfig, RetrySettings

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
STEPS = 6  # checkpoints every 2 steps
FAULT_STEP = 4
TRAINING = ("pretrain", "recipe-1", "recipe-2")
DEFAULT_STAGES = (*TRAINING, "merge-recipe-1", "merge-recipe-2", "average")  # without eval sets
STAGES = (*DEFAULT_STAGES, "evaluate")  # the module's run
EVALUATED = ["pretrain", "merge-recipe-1", "merge-recipe-2", "average"]  # the evaluate stage's models, in order
GRID = [0.3, 0.5, 0.7]  # recipe-1's weights the search tries: every candidate mixes both merges
EVALUATE_ARTIFACTS = ("evaluate-results", "evaluate-report", "average-weight-search", "evaluate-output")


def attempts(root: Path, stage: str) -> list[str]:
    return sorted(p.name for p in (root / stage / "logs").glob("attempt-*.log"))


def snapshot(root: Path) -> dict[str, tuple]:
    return {
        stage: (attempts(root, stage), (root / stage / "stage-complete.json").read_text(),
                (root / stage / "stage-complete.json").stat().st_mtime_ns)
        for stage in STAGES
    }


@pytest.fixture(scope="module")
def pipeline_run(prefect_api, tiny_assets, tmp_path_factory):
    from prefect.artifacts import Artifact

    from flows.pipeline import bunny_pipeline

    work = tmp_path_factory.mktemp("e2e")
    config = PipelineConfig.demo(tiny_assets, work / "out", steps=STEPS)
    fault = LaunchSettings(env={"BUNNY_FAULT_AT_STEP": str(FAULT_STEP), "BUNNY_FAULT_ONCE_FILE": str(work / "fault-once")})
    validation, test = split_heldout(tiny_assets, work / "eval-data")
    config = config.model_copy(update={
        "recipes": [config.recipes[0], config.recipes[1].model_copy(update={"launch": fault})],
        "retries": RetrySettings(retries=1, delay_seconds=0),
        "average": AverageSettings(weights="search", validation=validation, grid=GRID),
        "evaluate": EvaluateSettings(sets=[test], batch_size=4, max_new_tokens=8),
    })
    state = bunny_pipeline(config, return_state=True)
    first = state.result()
    after_first = snapshot(config.output_root)
    retried = prefect_cli("flow-run", "retry", str(state.state_details.flow_run_id),
                          "--entrypoint", "flows/pipeline.py:bunny_pipeline")
    after_retry = snapshot(config.output_root)
    second = bunny_pipeline(config)
    artifacts = {key: Artifact.get(key) for key in EVALUATE_ARTIFACTS}
    return {"config": config, "root": config.output_root, "first": first, "second": second, "retried": retried,
            "after_first": after_first, "after_retry": after_retry, "after_second": snapshot(config.output_root),
            "artifacts": artifacts, "eval_data": work / "eval-data"}


def prefect_cli(*args: str) -> subprocess.CompletedProcess:
    """A `prefect` command against the session's server, from the checkout."""
    from prefect.settings import PREFECT_API_URL

    return subprocess.run(
        [sys.executable, "-m", "prefect", *args], cwd=REPO, capture_output=True, text=True, timeout=900,
        env={**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()},
    )


def test_every_stage_ran_and_published_its_artifacts(pipeline_run):
    from prefect.artifacts import Artifact

    assert [(row["stage"], row["status"]) for row in pipeline_run["first"]] == [(s, "ran") for s in STAGES]
    for stage in STAGES:
        summary = Artifact.get(f"{stage}-summary")
        assert summary is not None and summary.type == "table", stage
        link = Artifact.get(f"{stage}-output")
        assert link is not None and str(pipeline_run["root"] / stage / "output") in link.data
    for stage in TRAINING:
        progress = Artifact.get(f"{stage}-progress")
        assert progress is not None and progress.type == "progress" and float(progress.data) == 100.0
        loss = json.loads(Artifact.get(f"{stage}-loss-table").data)
        assert [row["step"] for row in loss] == list(range(1, STEPS + 1)), stage
        assert "data:image/png;base64," in Artifact.get(f"{stage}-loss").data, stage
    assert "## Passed" in Artifact.get("preflight-report").data
    summary = Artifact.get("pipeline-summary").data
    assert "data:image/png;base64," in summary and all(f"| {stage} |" in summary for stage in STAGES)


LOG_TIME = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


def log_span(root: Path, stage: str) -> tuple[datetime, datetime]:
    """First and last timestamp a stage's attempt logs hold (deepspeed's and our loggers' lines)."""
    stamps = [datetime.fromisoformat(found) for name in attempts(root, stage)
              for found in LOG_TIME.findall((root / stage / "logs" / name).read_text())]
    assert stamps, f"no timestamped line in {stage}'s logs"
    return min(stamps), max(stamps)


def test_recipes_train_side_by_side_and_a_merge_starts_when_its_recipe_ends(pipeline_run):
    """The README's DAG: both recipes at once, each merge as soon as its own recipe is done
    (recipe-2 fails once and is retried, so recipe-1's merge runs while recipe-2 still trains)."""
    root = pipeline_run["root"]
    recipe_1, recipe_2 = log_span(root, "recipe-1"), log_span(root, "recipe-2")
    assert recipe_1[0] < recipe_2[1] and recipe_2[0] < recipe_1[1], (recipe_1, recipe_2)
    (first, first_span), (_, last_span) = sorted(
        [("recipe-1", recipe_1), ("recipe-2", recipe_2)], key=lambda item: item[1][1])
    merge_start = log_span(root, f"merge-{first}")[0]
    assert first_span[1] <= merge_start + timedelta(seconds=1) and merge_start < last_span[1], (first, merge_start, last_span)


def stage_tensors(root: Path, stage: str) -> dict[str, torch.Tensor]:
    """Every tensor of a stage's sharded safetensors output."""
    folder = root / stage / "output"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    loaded: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        loaded.update(load_file(folder / shard))
    return loaded


def searched_weights(root: Path) -> list[float]:
    return json.loads((root / "average" / "weight-search.json").read_text())["weights"]


def test_average_loads_and_is_the_weighted_sum_of_the_merges(pipeline_run):
    """The pipeline's output is the merges averaged with the searched weights (every grid point
    mixes both), recipe-2's config, and loads with the Auto classes."""
    import bunny  # noqa: F401  (registers the Bunny classes with the Auto classes)
    from transformers import AutoModelForCausalLM

    root = pipeline_run["root"]
    merged_1, merged_2, average = (stage_tensors(root, s) for s in ("merge-recipe-1", "merge-recipe-2", "average"))
    assert merged_1.keys() == merged_2.keys() == average.keys()
    assert any(not torch.equal(merged_1[k], merged_2[k]) for k in merged_1)  # two different models
    w1, w2 = searched_weights(root)
    assert w1 in GRID and w2 == pytest.approx(1 - w1)
    for name, value in average.items():
        expected = w1 * merged_1[name].double() + w2 * merged_2[name].double()
        torch.testing.assert_close(value.double(), expected.to(value.dtype).double(), rtol=1e-6, atol=1e-7)

    model = AutoModelForCausalLM.from_pretrained(root / "average" / "output")
    state = model.state_dict()
    for name, value in average.items():
        torch.testing.assert_close(state[name].to(value.dtype), value, rtol=0, atol=0, msg=name)
    inherited = json.loads((root / "average" / "output" / "config.json").read_text())
    assert inherited == json.loads((root / "merge-recipe-2" / "output" / "config.json").read_text())


def test_the_search_chose_the_grid_point_of_lowest_validation_loss(pipeline_run):
    root = pipeline_run["root"]
    curve = json.loads((root / "average" / "weight-search.json").read_text())
    assert [c["weights"][0] for c in curve["curve"]] == GRID
    best = min(curve["curve"], key=lambda c: c["loss"])
    assert curve["weights"] == best["weights"] and curve["loss"] == best["loss"]
    report = pipeline_run["artifacts"]["average-weight-search"]
    assert report.type == "markdown" and "data:image/png;base64," in report.data
    assert (root / "average" / "weight-search.png").is_file()
    # the evaluate stage's validation number for the average is the search's own
    table = json.loads(pipeline_run["artifacts"]["evaluate-results"].data)
    scored = next(r for r in table if (r["eval set"], r["model"]) == ("validation", "average"))
    assert scored["answer loss"] == pytest.approx(curve["loss"], rel=1e-3)


def test_evaluate_stage_publishes_every_model_on_every_set(pipeline_run):
    root, artifacts = pipeline_run["root"], pipeline_run["artifacts"]
    table = json.loads(artifacts["evaluate-results"].data)
    assert artifacts["evaluate-results"].type == "table"
    assert [(row["eval set"], row["model"]) for row in table] == [(s, m) for s in ("test", "validation") for m in EVALUATED]
    sizes = {name: len(json.loads((pipeline_run["eval_data"] / f"{name}.json").read_text())) for name in ("test", "validation")}
    assert all(row["records"] == sizes[row["eval set"]] and row["answer loss"] > 0 and 0 <= row["accuracy"] <= 1
               for row in table)
    report = artifacts["evaluate-report"]
    assert report.type == "markdown" and report.data.count("data:image/png;base64,") == 2
    for model in EVALUATED:
        assert f"| test | {model} |" in report.data
    assert (root / "evaluate" / "answer-loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (root / "evaluate" / "accuracy.png").is_file()
    records = (root / "evaluate" / "output" / "test" / "pretrain" / "output" / "records.jsonl").read_text().splitlines()
    assert len(records) == sizes["test"]


def test_recipe_2_failed_once_and_resumed_from_its_checkpoint(pipeline_run):
    root = pipeline_run["root"]
    assert attempts(root, "recipe-2") == ["attempt-1.log", "attempt-2.log"]
    assert f"injected failure after checkpoint-{FAULT_STEP}" in (root / "recipe-2" / "logs" / "attempt-1.log").read_text()
    done = json.loads((root / "recipe-2" / "output" / "training_complete.json").read_text())
    assert done["global_step"] == STEPS and done["resumed_from"].endswith(f"checkpoint-{FAULT_STEP}")
    steps = [json.loads(line)["step"] for line in (root / "recipe-2" / "output" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps.count(1) == 1  # continued, never restarted from step 1
    for stage in ("pretrain", "recipe-1", "merge-recipe-1"):
        assert attempts(root, stage) == ["attempt-1.log"], stage


def test_attempts_per_stage_are_in_the_rows_and_the_summary_artifact(pipeline_run):
    from prefect.artifacts import Artifact

    # one per attempt log (a stage may also be retried after a master-port collision)
    expected = {stage: len(attempts(pipeline_run["root"], stage)) for stage in STAGES}
    assert expected["recipe-2"] >= 2  # the injected failure
    assert {row["stage"]: row["attempts"] for row in pipeline_run["first"]} == expected
    assert {row["stage"]: row["attempts"] for row in pipeline_run["second"]} == expected  # skipped: as built
    published = markdown_rows(Artifact.get("pipeline-summary").data)
    assert {stage: int(cells["attempts"]) for stage, cells in published.items()} == expected


def markdown_rows(markdown: str) -> dict[str, dict[str, str]]:
    """The rows of the first markdown table that has a `stage` column, by stage."""
    lines = [line.strip() for line in markdown.splitlines() if line.strip().startswith("|")]
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    header = next(row for row in cells if "stage" in row)
    return {row[header.index("stage")]: dict(zip(header, row)) for row in cells
            if len(row) == len(header) and row != header and not set(row[0]) <= set("-: ")}


def test_a_flow_run_retry_skips_every_stage(pipeline_run):
    retried = pipeline_run["retried"]
    assert retried.returncode == 0, retried.stdout + retried.stderr
    output = retried.stdout + retried.stderr
    assert all(f"{stage}: complete from an earlier run, skipped" in output for stage in STAGES), output
    assert pipeline_run["after_retry"] == pipeline_run["after_first"]  # no new attempt, markers untouched


def test_second_run_with_the_same_config_skips_every_stage(pipeline_run):
    assert [(row["stage"], row["status"]) for row in pipeline_run["second"]] == [(s, "skipped") for s in STAGES]
    assert pipeline_run["after_second"] == pipeline_run["after_first"]  # the search and evaluation included
    output = pipeline_run["artifacts"]["evaluate-output"]
    assert output.description == "evaluate output (complete from an earlier run)"


def test_merge_and_average_flow_reproduces_the_pipelines_average(pipeline_run, tmp_path):
    from flows.config import MergeAverageConfig
    from flows.pipeline import merge_and_average

    root = pipeline_run["root"]
    w1, w2 = searched_weights(root)
    config = MergeAverageConfig(
        output_root=tmp_path / "merged",
        llm=pipeline_run["config"].llm,
        inputs=[{"name": "recipe-1", "lora_path": root / "recipe-1" / "output", "weight": w1},
                {"name": "recipe-2", "lora_path": root / "recipe-2" / "output", "weight": w2}],
    )
    rows = merge_and_average(config)
    assert [(row["stage"], row["status"]) for row in rows] == [
        ("merge-recipe-1", "ran"), ("merge-recipe-2", "ran"), ("average", "ran")]
    ours, theirs = tmp_path / "merged" / "average" / "output", root / "average" / "output"
    index = json.loads((ours / "model.safetensors.index.json").read_text())
    for shard in sorted(set(index["weight_map"].values())):
        mine, pipeline = load_file(ours / shard), load_file(theirs / shard)
        assert mine.keys() == pipeline.keys()
        assert all(torch.equal(mine[k], pipeline[k]) for k in mine)


def test_a_failed_preflight_stops_the_run_before_any_stage(prefect_api, tiny_assets, tmp_path):
    from prefect.artifacts import Artifact

    from flows.pipeline import bunny_pipeline
    from flows.preflight import PreflightError

    config = PipelineConfig.demo(tiny_assets, tmp_path / "out")
    config = config.model_copy(update={"llm": tmp_path / "no-llm", "vision_tower": tmp_path / "no-tower"})
    with pytest.raises(PreflightError, match=r"preflight found 2 problem\(s\)"):
        bunny_pipeline(config)
    report = Artifact.get("preflight-report").data
    assert "no-llm: no such folder" in report and "no-tower: no such folder" in report
    assert not (tmp_path / "out").exists()  # a failed preflight creates nothing


def training_processes(marker: str) -> list[int]:
    """Pids whose command line mentions `marker` (the run's own output folder)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state != "Z":
            found.append(int(entry))
    return found


def test_cancelling_a_run_leaves_no_training_process(prefect_api, tiny_assets, tmp_path):
    """What a worker or `flow.serve` does to cancel: SIGTERM to the flow process, mid-training."""
    from prefect.settings import PREFECT_API_URL

    root = tmp_path / "cancelled"
    config = PipelineConfig.demo(tiny_assets, root, steps=100_000)
    config_file = tmp_path / "config.json"
    config_file.write_text(config.model_dump_json())
    script = (
        "import sys; from flows.config import PipelineConfig; from flows.pipeline import bunny_pipeline\n"
        "bunny_pipeline(PipelineConfig.model_validate_json(open(sys.argv[1]).read()))"
    )
    flow_process = subprocess.Popen(
        [sys.executable, "-c", script, str(config_file)], cwd=REPO,
        env={**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 600  # preflight and a deepspeed start: minutes on a loaded machine
        progress = root / "pretrain" / "output" / "progress.json"
        while not progress.exists():
            assert flow_process.poll() is None, "the flow ended before training started"
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.5)
        assert training_processes(str(root))
        flow_process.send_signal(signal.SIGTERM)
        flow_process.wait(timeout=60)
    finally:
        if flow_process.poll() is None:
            flow_process.kill()
    deadline = time.monotonic() + 30
    while training_processes(str(root)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert training_processes(str(root)) == []
    assert attempts(root, "pretrain") == ["attempt-1.log"]  # a stopped stage is not retried
    assert "stopping the stage's processes" in (root / "pretrain" / "logs" / "attempt-1.log").read_text()
    assert not (root / "pretrain" / "stage-complete.json").exists()


def task_runs_of(flow_run_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def test_a_failed_stage_leaves_no_unfinished_task_run_even_after_a_retry(prefect_api, tiny_assets, tmp_path):
    """pretrain fails at once (its python cannot start): every later stage ends `NotRun`, named
    after its stage, in the first attempt and in a `prefect flow-run retry` of it."""
    from flows.pipeline import bunny_pipeline

    config = PipelineConfig.demo(tiny_assets, tmp_path / "out")
    broken = config.pretrain.model_copy(update={"launch": LaunchSettings(env={"PYTHONHOME": str(tmp_path / "none")})})
    config = config.model_copy(update={"pretrain": broken, "retries": RetrySettings(retries=0, delay_seconds=0)})
    state = bunny_pipeline(config, return_state=True)
    assert state.is_failed()
    run_id = state.state_details.flow_run_id
    retried = prefect_cli("flow-run", "retry", str(run_id), "--entrypoint", "flows/pipeline.py:bunny_pipeline")
    assert retried.returncode != 0  # pretrain fails again
    assert "not run: pretrain did not complete" in retried.stdout + retried.stderr

    expected = {("preflight", "COMPLETED")} | {("pretrain", "FAILED")} | {(s, "CANCELLED") for s in DEFAULT_STAGES[1:]}
    deadline = time.monotonic() + 30  # task runs reach the server as events
    while True:
        runs = task_runs_of(run_id)
        seen = sorted((run.name, run.state.type.value) for run in runs)
        if len(runs) == 2 * len(expected) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert seen == sorted(2 * list(expected)), seen  # two attempts, each stage once, all final
    assert {run.state.name for run in runs if run.state.type.value == "CANCELLED"} == {"NotRun"}
