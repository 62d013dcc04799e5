"""The flows under a real Prefect server, `process` work pool and worker, as users run them.

On the session's server (tests/conftest.py: its own PREFECT_HOME and port). Checks:
`prefect deploy ... --all` asks nothing in a terminal; `prefect flow-run cancel` through the
worker stops the stage's whole process tree and runs the cancellation hook without error.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, stop_group


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 :].split()[0] != b"Z"


@pytest.mark.parametrize("script, code", [
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", 128 + 9),  # as the supervisor reports it
    ("import sys; sys.exit(-9)", 247),  # as deepspeed's launcher reports a rank killed by SIGKILL
])
def test_a_killed_stage_names_the_signal_and_its_likely_cause(tmp_path, script, code):
    from flows.launcher import StageProcessError, run_supervised

    with pytest.raises(StageProcessError) as failure:
        run_supervised("recipe-1", [sys.executable, "-c", script], tmp_path / "k.log")
    assert f"recipe-1: exited with code {code}: killed by SIGKILL (signal 9): likely out of memory" in str(failure.value)
    assert "killed by SIGKILL" in (tmp_path / "k.log").read_text()  # the supervisor's own line


def test_a_plain_failure_names_no_signal(tmp_path):
    from flows.launcher import StageProcessError, run_supervised

    with pytest.raises(StageProcessError) as failure:
        run_supervised("merge", [sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "m.log")
    assert "merge: exited with code 3; full log" in str(failure.value)


@pytest.fixture(scope="module")
def server_env(prefect_server):
    """Environment of a client of the session's Prefect server, as a user's shell has it."""
    return prefect_server.client_env(PYTHONPATH=str(REPO), PREFECT_WORKER_QUERY_SECONDS="2")


def _prefect(env: dict, *args: str, timeout: float = 120) -> str:
    result = subprocess.run([sys.executable, "-m", "prefect", *args], env=env, capture_output=True, text=True,
                            timeout=timeout, stdin=subprocess.DEVNULL, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _run_in_terminal(command: list[str], env: dict, cwd: Path, timeout: float) -> tuple[int, str]:
    """Run `command` with a pseudo-terminal as stdin/stdout (so Prefect's CLI may prompt);
    nothing is ever typed. Returns the exit code and everything it printed."""
    leader, follower = pty.openpty()
    process = subprocess.Popen(command, stdin=follower, stdout=follower, stderr=follower, env=env, cwd=cwd,
                               start_new_session=True)
    os.close(follower)
    output = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 1.0)
            if ready:
                try:
                    chunk = os.read(leader, 4096)
                except OSError:  # the terminal's last writer is gone
                    break
                if not chunk:
                    break
                output += chunk
            elif process.poll() is not None:
                break
        else:
            raise AssertionError(f"still running after {timeout:g} s (waiting for an answer?):\n{output.decode()}")
    finally:
        stop_group(process)
        os.close(leader)
    return process.wait(), output.decode(errors="replace")


@pytest.mark.slow
def test_documented_deploy_command_asks_nothing_in_a_terminal(server_env, tmp_path):
    _prefect(server_env, "work-pool", "create", "bunny-gpu", "--type", "process")
    code, output = _run_in_terminal(
        [sys.executable, "-m", "prefect", "deploy", "--prefect-file", "deployments/prefect.yaml", "--all"],
        {**server_env, "BUNNY_REPO": str(REPO), "TERM": "xterm"}, REPO, timeout=240,
    )
    assert code == 0, output
    assert "[y/n]" not in output.lower() and "would you like" not in output.lower(), output
    for name in ("bunny-pipeline/bunny-v1-4b", "bunny-merge-average/merge-and-average"):
        assert "'bunny-gpu'" in _prefect(server_env, "deployment", "inspect", name), name

    # deployments/README.md's re-run commands (the runs stay scheduled: no worker serves this pool)
    default_config = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())["deployments"][0]["parameters"]["config"]
    created = _prefect(server_env, "deployment", "run", "bunny-pipeline/bunny-v1-4b", "--param", 'force=["recipe-2"]')
    first = _flow_run_parameters(server_env, created)
    assert first == {"force": ["recipe-2"], "config": default_config}
    if shutil.which("jq") is None:
        return  # the second command needs jq
    run_id = re.search(r"UUID: (\S+)", created).group(1)
    script = (f"prefect flow-run inspect {run_id} --output json "
              "| jq '{config: .parameters.config, force: [\"recipe-2\", \"average\"]}' > rerun.json && "
              "prefect deployment run 'bunny-pipeline/bunny-v1-4b' --params \"$(cat rerun.json)\"")
    rerun = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=server_env, capture_output=True, text=True,
                           timeout=600, stdin=subprocess.DEVNULL)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert _flow_run_parameters(server_env, rerun.stdout) == {"force": ["recipe-2", "average"], "config": default_config}


def _flow_run_parameters(env: dict, run_output: str) -> dict:
    """The parameters of the flow run whose creation `prefect deployment run` printed."""
    run_id = re.search(r"UUID: (\S+)", run_output).group(1)
    return json.loads(_prefect(env, "flow-run", "inspect", run_id, "--output", "json"))["parameters"]


LONG_CHILD_FLOW = """
import sys, time
from pathlib import Path
from prefect import flow
from flows.launcher import run_supervised
from flows.pipeline import STAGE_FLOW_OPTIONS, stages_stopped_on_exit

CHILD = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(900)"

@flow(name="long-child", **STAGE_FLOW_OPTIONS)
def long_child(pid_file: str, log: str) -> None:
    with stages_stopped_on_exit():
        run_supervised("long-stage", [sys.executable, "-c", CHILD, pid_file], Path(log), grace=3.0)
"""

DEPLOY_AND_RUN = """
import json, sys
from prefect.deployments import run_deployment
from long_child import long_child

long_child.from_source(source=sys.argv[1], entrypoint="long_child.py:long_child").deploy(
    name="cancel-test", work_pool_name="cancel-pool", print_next_steps=False)
run = run_deployment("long-child/cancel-test", parameters=json.loads(sys.argv[2]), timeout=0)
print(run.id)
"""

FLOW_RUN_STATE_AND_LOGS = """
import asyncio, sys
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

async def main(run_id):
    async with get_client() as client:
        run = await client.read_flow_run(run_id)
        logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
    print(run.state.type.value)
    for log in logs:
        print(log.message)

asyncio.run(main(sys.argv[1]))
"""


@pytest.mark.slow
def test_cancel_through_the_worker_stops_the_stage_tree_and_runs_the_hook(server_env, tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    (source / "long_child.py").write_text(textwrap.dedent(LONG_CHILD_FLOW))
    (source / "deploy_and_run.py").write_text(textwrap.dedent(DEPLOY_AND_RUN))
    (source / "inspect_run.py").write_text(textwrap.dedent(FLOW_RUN_STATE_AND_LOGS))
    env = {**server_env, "PYTHONPATH": os.pathsep.join([str(REPO), str(source)])}
    pid_file = tmp_path / "child.pid"

    _prefect(env, "work-pool", "create", "cancel-pool", "--type", "process")
    with open(tmp_path / "worker.log", "wb") as worker_log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", "cancel-pool"],
            stdout=worker_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=source,
            start_new_session=True,
        )
    try:
        parameters = json.dumps({"pid_file": str(pid_file), "log": str(tmp_path / "stage.log")})
        deployed = subprocess.run([sys.executable, "deploy_and_run.py", str(source), parameters], env=env,
                                  cwd=source, capture_output=True, text=True, timeout=180)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        run_id = deployed.stdout.strip().splitlines()[-1]

        deadline = time.monotonic() + 240
        while not (pid_file.exists() and pid_file.read_text()):
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()
            assert time.monotonic() < deadline, "the flow run's child never started:\n" + (
                tmp_path / "worker.log").read_text()
            time.sleep(1)
        child = int(pid_file.read_text())
        assert _alive(child)

        _prefect(env, "flow-run", "cancel", run_id)
        deadline = time.monotonic() + 120
        state = ""
        while time.monotonic() < deadline:
            inspected = subprocess.run([sys.executable, "inspect_run.py", run_id], env=env, cwd=source,
                                       capture_output=True, text=True, timeout=60)
            state, *run_logs = inspected.stdout.splitlines()
            if state == "CANCELLED" and not _alive(child):
                break
            time.sleep(2)
        time.sleep(3)  # the worker's hook runner acts after the state change
        worker_output = (tmp_path / "worker.log").read_text()
        assert state == "CANCELLED", worker_output
        assert not _alive(child), "the stage's child outlived the cancelled flow run"
        everything = worker_output + "\n".join(run_logs)
        assert "An error was encountered while running hook" not in everything, everything
        assert "_stop_stages_hook" not in everything or "Traceback" not in everything, everything
    finally:
        stop_group(worker)
        if pid_file.exists() and pid_file.read_text() and _alive(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
