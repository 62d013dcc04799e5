"""Several runs and hosts on one Prefect server (the session's), on the CPU:

* GPU slots: global concurrency limits named after host and GPU id, created on demand, held
  by stages whose (fake) GPU sets overlap one after the other, waiting said in the log;
* master ports: two flow runs in two processes, same configured port, `retries=0`, at once;
* work pools: two `process` workers on two pools run one pipeline's recipes (and merges)
  through the per-stage deployment, on the shared output folder.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from flows.config import LaunchSettings, PipelineConfig, RetrySettings

REPO = Path(__file__).resolve().parents[1]
POOLS = ("pool-a", "pool-b")


def api_env(**extra: str) -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), **extra}


@pytest.mark.slow
def test_stages_on_overlapping_gpus_take_turns_through_global_slots(prefect_api):
    from prefect import get_client

    from flows.gpus import Placement
    from flows.slots import hold_gpu_slots

    spans: dict[str, tuple[float, float]] = {}
    waited: list[str] = []
    errors: list[BaseException] = []

    holding = {name: threading.Event() for name in "abc"}
    b_waits = threading.Event()

    def on_wait(name: str) -> None:
        waited.append(name)
        b_waits.set()

    def stage(name: str, devices: tuple[int, ...]) -> None:
        try:
            with hold_gpu_slots(Placement(devices=devices).gpu_slots(), on_wait=lambda: on_wait(name)):
                holding[name].set()
                begin = time.monotonic()
                if name == "a":  # hold GPUs 0 and 1 until b waits for GPU 1 and c runs on GPU 3 (or a minute)
                    b_waits.wait(timeout=60) and holding["c"].wait(timeout=60)
                time.sleep(1)
                spans[name] = (begin, time.monotonic())
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    first = threading.Thread(target=stage, args=("a", (0, 1)))
    first.start()
    assert holding["a"].wait(timeout=120)  # "a" holds GPUs 0 and 1 (creating slots on demand takes a while)
    others = [threading.Thread(target=stage, args=args) for args in (("b", (1, 2)), ("c", (3,)))]
    for thread in others:
        thread.start()
    for thread in [first, *others]:
        thread.join(timeout=120)
    assert errors == []
    (a0, a1), (b0, b1), (c0, _) = spans["a"], spans["b"], spans["c"]
    assert a1 <= b0  # GPU 1 is shared: b waited for a
    assert c0 < a1  # GPU 3 was free: c ran alongside a
    assert waited == ["b"]
    host = socket.gethostname()
    with get_client(sync_client=True) as client:
        for index in range(4):
            limit = client.read_global_concurrency_limit_by_name(f"gpu:{host}:{index}")
            assert (limit.limit, limit.active_slots) == (1, 0)


def one_stage_flow_script() -> str:
    """A flow run of the pipeline's own training task (pretrain) from a config file."""
    return (
        "import sys\n"
        "from prefect import flow\n"
        "from flows.config import PipelineConfig\n"
        "from flows.gpus import plan_placements, visible_gpus\n"
        "from flows.stages import pipeline_jobs\n"
        "from flows.tasks import stage_task\n"
        "@flow(name='one-stage')\n"
        "def one_stage(config: PipelineConfig):\n"
        "    job = pipeline_jobs(config, plan_placements(config, visible_gpus()))['pretrain']\n"
        "    return stage_task(job)(job, {})\n"
        "one_stage(PipelineConfig.model_validate_json(open(sys.argv[1]).read()))\n"
    )


@pytest.mark.slow
def test_two_flow_runs_at_once_with_the_same_master_port_both_complete(prefect_api, tiny_assets, tmp_path):
    with socket.socket() as probe:
        probe.bind(("", 0))
        port = probe.getsockname()[1]  # the same, free, configured port for both
    runs = []
    for name in ("run-1", "run-2"):
        config = PipelineConfig.demo(tiny_assets, tmp_path / name, steps=2)
        config = config.model_copy(update={
            "gpus": config.gpus.model_copy(update={"master_port": port}),
            "retries": RetrySettings(retries=0, delay_seconds=0),
        })
        config_file = tmp_path / f"{name}.json"
        config_file.write_text(config.model_dump_json())
        runs.append(subprocess.Popen(
            [sys.executable, "-c", one_stage_flow_script(), str(config_file)], cwd=REPO, env=api_env(),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))
    outputs = [run.communicate(timeout=900)[0] for run in runs]
    for name, run, output in zip(("run-1", "run-2"), runs, outputs):
        assert run.returncode == 0, output[-4000:]
        assert (tmp_path / name / "pretrain" / "stage-complete.json").exists()
        assert sorted(p.name for p in (tmp_path / name / "pretrain" / "logs").iterdir()) == ["attempt-1.log"]
    used = [re.findall(r"--master_port (\d+)", (tmp_path / n / "pretrain" / "logs" / "attempt-1.log").read_text())
            for n in ("run-1", "run-2")]
    assert port in {int(p) for ports in used for p in ports}
    assert not set(used[0]) & set(used[1]), used  # never the same port at once


@pytest.fixture(scope="module")
def workers(prefect_api, tmp_path_factory):
    """A `process` work pool per host stand-in, the per-stage flow deployed to each, a worker
    on each."""
    from prefect import flow, get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    logs = tmp_path_factory.mktemp("workers")
    with get_client(sync_client=True) as client:
        for pool in POOLS:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
    for pool in POOLS:
        flow.from_source(source=str(REPO), entrypoint="flows/stage_flow.py:bunny_stage").deploy(
            name=pool, work_pool_name=pool, build=False, push=False, print_next_steps=False,
            job_variables={"env": {"PYTHONPATH": str(REPO)}},
        )
    started = []
    for pool in POOLS:
        log = open(logs / f"{pool}.log", "w")
        started.append((subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process"],
            cwd=REPO, env=api_env(PREFECT_WORKER_QUERY_SECONDS="1"), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        ), log))
    yield logs
    for process, log in started:
        process.send_signal(signal.SIGINT)
    for process, log in started:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


@pytest.mark.slow
def test_two_workers_on_two_pools_run_one_pipelines_recipes(workers, tiny_assets, tmp_path):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    from flows.pipeline import bunny_pipeline

    config = PipelineConfig.demo(tiny_assets, tmp_path / "out", steps=2)
    recipes = [recipe.model_copy(update={"launch": LaunchSettings(work_pool=pool)})
               for recipe, pool in zip(config.recipes, POOLS)]
    config = config.model_copy(update={"recipes": recipes, "retries": RetrySettings(retries=0, delay_seconds=0)})
    state = bunny_pipeline(config, return_state=True)
    rows = state.result()
    pipeline_run_id = str(state.state_details.flow_run_id)
    assert [(row["stage"], row["status"]) for row in rows] == [
        (stage, "ran") for stage in ("pretrain", "recipe-1", "recipe-2", "merge-recipe-1", "merge-recipe-2", "average")]

    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[state.state_details.flow_run_id])))
        deployments = {d.id: d.name for d in client.read_deployments()}
    where = {run.name: (deployments.get(run.deployment_id), run.work_pool_name, run.state.name) for run in children}
    assert where == {
        "recipe-1": ("pool-a", "pool-a", "Completed"), "merge-recipe-1": ("pool-a", "pool-a", "Completed"),
        "recipe-2": ("pool-b", "pool-b", "Completed"), "merge-recipe-2": ("pool-b", "pool-b", "Completed"),
    }
    root = config.output_root
    for stage in ("recipe-1", "recipe-2", "merge-recipe-1", "merge-recipe-2"):
        marker = json.loads((root / stage / "stage-complete.json").read_text())
        assert marker["flow_run_id"] == pipeline_run_id, stage  # the pipeline run's stage, run elsewhere


def test_stage_deployments_are_named_after_their_work_pool(monkeypatch):
    """`bunny-stage/<pool>` is how a stage finds its pool's deployment (flows.stages.RemoteStage)."""
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.flows import load_flow_from_entrypoint

    from flows.stages import STAGE_FLOW

    raw = yaml.safe_load((REPO / "deployments" / "stages.yaml").read_text())
    PrefectYamlModel.model_validate(raw)
    assert raw["deployments"] and all(d["name"] == d["work_pool"]["name"] for d in raw["deployments"])
    monkeypatch.chdir(REPO)
    for entrypoint in {d["entrypoint"] for d in raw["deployments"]}:
        assert load_flow_from_entrypoint(entrypoint, use_placeholder_flow=False).name == STAGE_FLOW
