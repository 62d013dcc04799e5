"""The supervised launcher: logs, errors with the log's tail, timeouts and process-group kills."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from flows.launcher import (
    StageProcessError,
    StageStopped,
    StageTimeout,
    active_launches,
    allow_launches,
    run_supervised,
    stop_all,
)

# A stage stand-in: a child that starts a grandchild, both ignoring SIGTERM (only SIGKILL stops
# them), writes both pids to a file, then sleeps.
STUBBORN_TREE = textwrap.dedent(
    """
    import os, signal, subprocess, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    grandchild = subprocess.Popen([sys.executable, "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
    with open(sys.argv[1] + ".tmp", "w") as f:
        f.write(f"{os.getpid()} {grandchild.pid}")
    os.replace(sys.argv[1] + ".tmp", sys.argv[1])
    print("tree is up", flush=True)
    time.sleep(600)
    """
)


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_for_file(path: Path, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)
    return path.read_text()


def wait_dead(pids: list[int], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while any(map(alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(map(alive, pids)), [p for p in pids if alive(p)]


@pytest.fixture(autouse=True)
def launches_allowed():
    """Each test starts like a new flow run: an earlier `stop_all` in this process is over."""
    allow_launches()


@pytest.fixture
def tree_script(tmp_path) -> Path:
    script = tmp_path / "tree.py"
    script.write_text(STUBBORN_TREE)
    return script


def test_every_line_goes_to_the_log_and_a_digest_to_the_logger(tmp_path, caplog):
    script = "import sys\nfor i in range(30): print('line', i)\nprint('to stderr', file=sys.stderr)"
    log = tmp_path / "logs" / "attempt-1.log"
    with caplog.at_level(logging.INFO):
        result = run_supervised("demo", [sys.executable, "-c", script], log, logger=logging.getLogger("t"))
    text = log.read_text()
    assert text.startswith("$ ") and "line 0\n" in text and "line 29\n" in text and "to stderr" in text
    assert result.log_path == log and result.seconds > 0
    digest = "\n".join(r.getMessage() for r in caplog.records)
    assert "to stderr" in digest and "line 0\n" not in digest and "earlier lines in" in digest


def test_child_environment_gets_the_extras_and_the_project(tmp_path):
    script = "import os; print(os.environ['BUNNY_X'], os.environ['PYTHONUNBUFFERED']); import flows.supervisor"
    log = tmp_path / "env.log"
    run_supervised("env", [sys.executable, "-c", script], log, env={"BUNNY_X": "42"}, cwd=tmp_path)
    assert "42 1" in log.read_text()


def test_a_failure_raises_with_the_tail_of_the_log(tmp_path):
    script = ("import sys\nfor i in range(100): print('step', i)\n"
              "print('10%\\r50%\\r90%'); print('CUDA out of memory'); sys.exit(3)")
    with pytest.raises(StageProcessError) as caught:
        run_supervised("recipe-9", [sys.executable, "-c", script], tmp_path / "fail.log")
    message = str(caught.value)
    assert "recipe-9: exited with code 3" in message and str(tmp_path / "fail.log") in message
    assert "CUDA out of memory" in message and "step 99" in message and "step 10\n" not in message
    assert "\n90%\n" in message and "50%" not in message  # progress bars: only what a terminal shows
    assert b"10%\r50%\r90%" in (tmp_path / "fail.log").read_bytes()  # the log keeps every byte


def test_timeout_kills_the_whole_group(tmp_path, tree_script):
    pids_file = tmp_path / "pids"
    started = time.monotonic()
    with pytest.raises(StageTimeout, match="stopped \\(timeout after 2 s\\)"):
        run_supervised("slow", [sys.executable, str(tree_script), str(pids_file)], tmp_path / "t.log",
                       timeout=2, grace=0.5, tick_seconds=0.2)
    assert time.monotonic() - started < 15
    pids = [int(p) for p in pids_file.read_text().split()]
    wait_dead(pids)
    assert active_launches() == []
    assert "tree is up" in (tmp_path / "t.log").read_text()


def test_stop_all_stops_running_stages_from_another_thread(tmp_path, tree_script):
    pids_file = tmp_path / "pids"
    errors: list[BaseException] = []

    def stage() -> None:
        try:
            run_supervised("s", [sys.executable, str(tree_script), str(pids_file)], tmp_path / "s.log", grace=0.5)
        except StageProcessError as exc:
            errors.append(exc)

    thread = threading.Thread(target=stage)
    thread.start()
    pids = [int(p) for p in wait_for_file(pids_file).split()]
    assert stop_all("flow run cancelled", wait=True) == 1
    thread.join(timeout=20)
    assert not thread.is_alive()
    wait_dead(pids)
    assert len(errors) == 1 and isinstance(errors[0], StageStopped)
    assert "stopped (flow run cancelled)" in str(errors[0]) and "tree is up" in str(errors[0])
    assert "[supervisor] stopping the stage's processes" in (tmp_path / "s.log").read_text()
    with pytest.raises(StageStopped, match="not started: the flow run is stopping"):
        run_supervised("retry", [sys.executable, "-c", "print(1)"], tmp_path / "r.log")
    allow_launches()
    run_supervised("next run", [sys.executable, "-c", "print(1)"], tmp_path / "r.log")


def test_a_killed_flow_process_leaves_nothing_behind(tmp_path, tree_script):
    """SIGKILL of the process that launched the stage: no hook runs, the supervisor cleans up."""
    pids_file = tmp_path / "pids"
    parent = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from flows.launcher import run_supervised
        run_supervised("s", [sys.executable, {str(tree_script)!r}, {str(pids_file)!r}], Path({str(tmp_path / 'p.log')!r}), grace=0.5)
        """
    )
    flow_process = subprocess.Popen([sys.executable, "-c", parent], cwd=Path(__file__).resolve().parents[1])
    try:
        pids = [int(p) for p in wait_for_file(pids_file).split()]
        assert all(map(alive, pids))
    finally:
        flow_process.kill()
        flow_process.wait()
    wait_dead(pids)


def test_a_killed_supervisor_leaves_nothing_behind(tmp_path, tree_script):
    """SIGKILL of the stage's supervisor (found by benchmarks/fault_trials.py): the flow kills its
    group, else the launcher and ranks would train on beside the task's retry."""
    pids_file = tmp_path / "pids"
    errors: list[BaseException] = []

    def stage() -> None:
        try:
            run_supervised("s", [sys.executable, str(tree_script), str(pids_file)], tmp_path / "s.log",
                           grace=0.5, tick_seconds=0.2)
        except StageProcessError as exc:
            errors.append(exc)

    thread = threading.Thread(target=stage)
    thread.start()
    pids = [int(p) for p in wait_for_file(pids_file).split()]
    [launch] = active_launches()
    os.kill(launch.process.pid, signal.SIGKILL)
    thread.join(timeout=20)
    assert not thread.is_alive()
    assert len(errors) == 1 and "killed by SIGKILL" in str(errors[0])
    wait_dead(pids)


def test_supervisor_passes_the_exit_status_of_a_signalled_child(tmp_path):
    script = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    with pytest.raises(StageProcessError, match=f"exited with code {128 + signal.SIGKILL}"):
        run_supervised("killed", [sys.executable, "-c", script], tmp_path / "k.log")


def test_supervisor_must_lead_its_group():
    result = subprocess.run(
        [sys.executable, str(Path(__file__).resolve().parents[1] / "flows" / "supervisor.py"),
         "--parent-pid", str(os.getpid()), "--", "true"],
        capture_output=True, text=True,
    )
    assert result.returncode == 2 and "process group leader" in result.stderr
