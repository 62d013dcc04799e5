"""flows.artifacts: the loss chart and table, their live refresh, and the pipeline summary,
against a recording stand-in for Prefect's artifact API (no server, no training)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

import flows.artifacts as artifacts
from flows.charts import DEFAULT_SIZE
from test_charts import decode_png


class ArtifactRecorder:
    """Every artifact call, in order: (kind, key, data)."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, str | None, object]] = []
        self.progress: dict[str, str] = {}
        self.ids: dict[str, str] = {}
        monkeypatch.setattr(artifacts, "create_markdown_artifact", self._create_markdown)
        monkeypatch.setattr(artifacts, "update_markdown_artifact", lambda artifact_id, markdown, description=None: self.calls.append(("markdown-update", self.ids[artifact_id], markdown)))
        monkeypatch.setattr(artifacts, "create_table_artifact", lambda table, key, description=None: self.calls.append(("table", key, table)))
        monkeypatch.setattr(artifacts, "create_progress_artifact", self._create_progress)
        monkeypatch.setattr(artifacts, "update_progress_artifact", lambda artifact_id, progress, description=None: self.calls.append(("progress", self.progress[artifact_id], progress)))

    def _create_markdown(self, markdown, key, description=None):
        artifact_id = f"id-{len(self.ids)}"
        self.ids[artifact_id] = key
        self.calls.append(("markdown", key, markdown))
        return artifact_id

    def created(self, key: str) -> int:
        return sum(1 for kind, k, _data in self.calls if k == key and kind == "markdown")

    def _create_progress(self, progress, key, description=None):
        artifact_id = f"id-{key}"
        self.progress[artifact_id] = key
        self.calls.append(("progress", key, progress))
        return artifact_id

    def versions(self, key: str) -> list[object]:
        return [data for _kind, k, data in self.calls if k == key]


@pytest.fixture
def recorder(monkeypatch):
    return ArtifactRecorder(monkeypatch)


def metrics_line(step: int, total: int, loss: float, groups: dict[str, float] | None = None) -> dict:
    line = {"step": step, "max_steps": total, "epoch": step / total, "loss": loss, "learning_rate": 2e-4 * (1 - step / total)}
    for group, scale in (groups or {}).items():
        line[f"learning_rate/{group}"] = line["learning_rate"] * scale
    return line


def write_metrics(output: Path, lines: list[dict], torn_tail: bool = False) -> None:
    output.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(line) + "\n" for line in lines)
    (output / "metrics.jsonl").write_text(text + ('{"step": 9' if torn_tail else ""))
    if lines:
        (output / "progress.json").write_text(json.dumps(lines[-1]))


def noisy_loss(step: int) -> float:
    return 2.0 + 4.0 * math.exp(-step / 300) + 0.3 * math.sin(step * 1.7)


def test_loss_chart_artifact_holds_a_png_and_the_summary(recorder, tmp_path):
    output = tmp_path / "recipe-1" / "output"
    lines = [metrics_line(s, 12, noisy_loss(s), {"lora": 1.0, "mm_projector": 0.1}) for s in range(1, 13)]
    lines.append({"step": 12, "max_steps": 12, "train_runtime": 30.0, "train_samples_per_second": 3.2,
                  "num_input_tokens_seen": 4500})
    write_metrics(output, lines, torn_tail=True)

    picture = artifacts.publish_loss_curve("recipe-1", output)

    markdown = recorder.versions("recipe-1-loss")[-1]
    image = decode_png(markdown)
    assert image.size == DEFAULT_SIZE
    assert picture == tmp_path / "recipe-1" / "loss.png" and Image.open(picture).size == DEFAULT_SIZE
    losses = [line["loss"] for line in lines[:12]]
    lowest = min(range(12), key=losses.__getitem__)
    expected = ["first loss", "last loss", "lowest loss", "lowest at step", "steps", "train seconds", "samples/s", "tokens/s"]
    header, _, row = [line for line in markdown.splitlines() if line.startswith("|")]
    assert header == "| " + " | ".join(expected) + " |"
    assert row == "| " + " | ".join([f"{losses[0]:.4g}", f"{losses[-1]:.4g}", f"{losses[lowest]:.4g}", str(lowest + 1),
                                      "12 / 12", "30", "3.2", "150"]) + " |"


def test_loss_table_is_downsampled_rounded_and_has_one_column_per_parameter_group(recorder, tmp_path):
    output = tmp_path / "pretrain" / "output"
    total = 8700
    lines = [metrics_line(s, total, noisy_loss(s), {"lora": 1.0, "mm_projector": 0.1}) for s in range(1, total + 1)]
    lines[5000]["loss"] = 0.123456789  # the lowest, off the even grid
    lines.insert(100, metrics_line(101, total, 99.0))  # an earlier attempt's line for step 101: superseded
    write_metrics(output, lines)

    artifacts.publish_loss_curve("pretrain", output)

    (table,) = recorder.versions("pretrain-loss-table")
    assert len(table) <= artifacts.MAX_LOSS_ROWS
    assert list(table[0]) == ["step", "loss", "learning_rate/lora", "learning_rate/mm_projector", "epoch"]
    steps = [row["step"] for row in table]
    assert steps[0] == 1 and steps[-1] == total and 5001 in steps
    assert {"step": 5001, "loss": 0.1235} == {k: table[steps.index(5001)][k] for k in ("step", "loss")}
    for row in table:
        for key in ("loss", "learning_rate/lora", "epoch"):
            value = row[key]
            assert value == 0 or value == float(f"{value:.4g}"), (key, value)
        source = lines[row["step"] - 1] if row["step"] <= 100 else lines[row["step"]]
        assert row["loss"] == pytest.approx(source["loss"], rel=5e-4)
    assert 99.0 not in [row["loss"] for row in table]


def test_learning_rate_falls_back_to_the_single_key(tmp_path):
    output = tmp_path / "pretrain" / "output"
    write_metrics(output, [metrics_line(s, 3, 1.0 / s) for s in range(1, 4)])
    rows = artifacts.loss_curve(output)
    assert [list(row) for row in rows] == [["step", "loss", "learning_rate", "epoch"]] * 3
    assert [row["loss"] for row in rows] == [1.0, 0.5, 0.3333]


def test_a_resumed_run_counts_each_step_once_with_its_latest_loss(tmp_path):
    output = tmp_path / "recipe-1" / "output"
    first_attempt = [metrics_line(s, 4, 1.0) for s in (1, 2, 3)]
    resumed_from_step_2 = [metrics_line(s, 4, 0.5) for s in (3, 4)]
    write_metrics(output, first_attempt + resumed_from_step_2)
    assert [(r["step"], r["loss"]) for r in artifacts.loss_history(output)] == [(1, 1.0), (2, 1.0), (3, 0.5), (4, 0.5)]


def test_importing_flows_does_not_import_the_plotting_library():
    import subprocess
    import sys

    code = "import sys, flows.artifacts, flows.pipeline; print('matplotlib' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_live_refresh_publishes_new_versions_while_the_stage_trains(recorder, tmp_path):
    output = tmp_path / "recipe-2" / "output"
    progress = artifacts.TrainingProgress("recipe-2", output, chart_interval_seconds=0)
    lines = []
    for step in range(1, 4):
        lines.append(metrics_line(step, 3, noisy_loss(step)))
        write_metrics(output, lines)
        progress.update()
        progress.update()  # nothing new: no new version
    progress.finish(3)
    artifacts.publish_loss_curve("recipe-2", output)

    charts = recorder.versions("recipe-2-loss")
    assert len(charts) == 4  # one per new step while training, then the final one
    assert recorder.created("recipe-2-loss") == 2  # the live one (updated in place), then the final version
    assert [c.splitlines()[0] for c in charts] == [f"### recipe-2: training loss (live, step {s})" for s in range(1, 4)] + [
        "### recipe-2: training loss (final)"]
    for chart in charts:
        assert decode_png(chart).size == DEFAULT_SIZE
    assert charts[0] != charts[1]  # a new picture, not the same one again
    assert recorder.versions("recipe-2-progress") == [0.0, *(100.0 * s / 3 for s in range(1, 4)), 100.0]
    assert len(recorder.versions("recipe-2-loss-table")) == 1  # the table only at the end


def test_live_refresh_waits_its_interval(recorder, tmp_path):
    output = tmp_path / "recipe-1" / "output"
    progress = artifacts.TrainingProgress("recipe-1", output, chart_interval_seconds=3600)
    lines = []
    for step in range(1, 5):
        lines.append(metrics_line(step, 4, 1.0))
        write_metrics(output, lines)
        progress.update()
    assert len(recorder.versions("recipe-1-loss")) == 1  # the first point at once, then not within the hour


def test_a_chart_that_cannot_be_drawn_does_not_fail_the_stage(recorder, tmp_path, monkeypatch):
    output = tmp_path / "pretrain" / "output"
    write_metrics(output, [metrics_line(s, 3, 1.0) for s in range(1, 4)])

    def broken(*args, **kwargs):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(artifacts, "loss_chart", broken)
    assert artifacts.publish_loss_curve("pretrain", output) is None
    (markdown,) = recorder.versions("pretrain-loss")
    assert "data:image" not in markdown and "| first loss |" in markdown
    assert len(recorder.versions("pretrain-loss-table")) == 1


def test_pipeline_summary_charts_every_training_stage_and_tables_every_key(recorder, tmp_path):
    rows = []
    for stage, steps in (("pretrain", 40), ("recipe-1", 20), ("merge-recipe-1", 0)):
        output = tmp_path / stage / "output"
        if steps:
            write_metrics(output, [metrics_line(s, steps, noisy_loss(s)) for s in range(1, steps + 1)])
        else:
            output.mkdir(parents=True)
        rows.append({"stage": stage, "status": "ran", "seconds": 12.3456, "steps": steps or None,
                     "final_loss": 1.23456789 if steps else None, "attempts": 2, "output": str(output)})

    artifacts.publish_pipeline_summary(rows)

    (markdown,) = recorder.versions("pipeline-summary")
    assert decode_png(markdown).size == DEFAULT_SIZE
    assert Image.open(tmp_path / "pipeline-loss.png").size == DEFAULT_SIZE
    table = [line for line in markdown.splitlines() if line.startswith("|")]
    assert table[0] == "| stage | status | seconds | steps | final_loss | attempts | output |"
    assert table[2] == f"| pretrain | ran | 12.35 | 40 | 1.235 | 2 | `{tmp_path / 'pretrain' / 'output'}` |"
    assert table[4].startswith("| merge-recipe-1 | ran | 12.35 | — | — | 2 |")

    curves = artifacts.pipeline_loss_chart(rows[:1])
    assert curves is not None and curves.png != artifacts.pipeline_loss_chart(rows[:2]).png  # each stage drawn


def test_pipeline_summary_without_training_stages_is_just_the_table(recorder, tmp_path):
    artifacts.publish_pipeline_summary([{"stage": "average", "status": "skipped", "output": str(tmp_path / "none")}])
    (markdown,) = recorder.versions("pipeline-summary")
    assert "data:image" not in markdown and "| average | skipped |" in markdown


@pytest.mark.slow
def test_live_chart_is_one_artifact_updated_in_place_on_a_prefect_server(prefect_api, tmp_path):
    from prefect import flow
    from prefect.artifacts import Artifact
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    stage = "live-chart-test"  # an artifact key no other test on the session's server writes
    output = tmp_path / stage / "output"

    @flow
    def training() -> None:
        progress = artifacts.TrainingProgress(stage, output, chart_interval_seconds=0)
        lines = []
        for step in (1, 2):
            lines.append(metrics_line(step, 2, noisy_loss(step)))
            write_metrics(output, lines)
            progress.update()

    training()
    latest = Artifact.get(f"{stage}-loss")
    with get_client(sync_client=True) as client:
        versions = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"{stage}-loss"])))
    assert latest.type == "markdown" and latest.data.startswith(f"### {stage}: training loss (live, step 2)")
    assert latest.description == f"{stage} training loss (live, step 2)"
    assert decode_png(latest.data).size == DEFAULT_SIZE
    assert len(versions) == 1


def load_ui_snapshot():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "ui_snapshot.py"
    spec = importlib.util.spec_from_file_location("ui_snapshot", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv, message", [
    (["not-a-uuid", "--api-url", "http://127.0.0.1:9/api"], "'not-a-uuid' is not a flow run id"),
    (["00000000-0000-0000-0000-000000000001", "--api-url", "http://127.0.0.1:9/api", "--chromium", "/nonexistent/chromium"],
     "no Chromium found (/nonexistent/chromium)"),
    (["00000000-0000-0000-0000-000000000001", "--api-url", "http://127.0.0.1:9/api", "--chromium", "/bin/true"],
     "cannot reach the Prefect API at http://127.0.0.1:9/api (--api-url)"),
])
def test_ui_snapshot_refuses_bad_input_in_one_line(argv, message, capsys, monkeypatch):
    monkeypatch.delenv("BUNNY_DEBUG", raising=False)
    assert load_ui_snapshot().main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ui_snapshot: error: {message}") and "Traceback" not in err
