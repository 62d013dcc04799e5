"""`python -m flows.demo` as a new user runs it, and what keeps its console informative."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ["pretrain", "recipe-1", "recipe-2", "merge-recipe-1", "merge-recipe-2", "average", "evaluate"]  # the demo scores its models


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def listening_logger(name: str) -> tuple[logging.Logger, ListHandler]:
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    handler = ListHandler()
    logger.addHandler(handler)
    return logger, handler


class FakeTrainingProgress:
    """What `ProgressLines` reads of `flows.artifacts.TrainingProgress`: `update()` and `last`."""

    def __init__(self, steps: list[tuple[int, int] | None]) -> None:
        self.steps = steps
        self.last: tuple[int, int] | None = None

    def update(self) -> None:
        self.last = self.steps.pop(0)


def test_progress_lines_say_step_total_and_elapsed():
    from flows.tasks import EVENT, ProgressLines

    logger, caught = listening_logger("progress-test-lines")
    progress = FakeTrainingProgress([None, (3, 12), (12, 12)])
    lines = ProgressLines("recipe-1", progress, logger, every=0.0)
    for _ in range(3):
        lines()
    messages = [r.getMessage() for r in caught.records]
    assert [m.rsplit(",", 1)[0] for m in messages] == [
        "recipe-1: starting", "recipe-1: step 3 / 12", "recipe-1: step 12 / 12"]
    assert all(m.endswith(" s") for m in messages)
    assert all(getattr(r, "bunny_event", False) == EVENT["bunny_event"] for r in caught.records)  # on the demo's console


def test_progress_lines_are_throttled():
    from flows.tasks import ProgressLines

    logger, caught = listening_logger("progress-test-throttle")
    progress = FakeTrainingProgress([(1, 12), (2, 12), (3, 12)])
    lines = ProgressLines("recipe-1", progress, logger, every=3600.0)
    for _ in range(3):
        lines()
    assert caught.records == [] and progress.last == (3, 12)  # the artifact still follows every step


def test_each_environment_gets_its_own_torch_extension_cache(monkeypatch, tmp_path):
    from flows import cpu_ops

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    ours = cpu_ops.extensions_dir()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(ours)  # the stages inherit it
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "another-venv"))
    assert cpu_ops.environment_extensions_dir() != ours
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "mine"))
    assert cpu_ops.extensions_dir() == tmp_path / "mine"  # a user's choice is kept


def processes_with_env(name: str, value: str) -> list[str]:
    """Command lines of live processes whose environment holds name=value."""
    needle = f"{name}={value}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if needle in environ:
            found.append(cmdline)
    return found


def table_rows(output: str) -> dict[str, list[str]]:
    """The demo's stage table: stage -> its other columns."""
    rows = {}
    for line in output.splitlines():
        words = line.split()
        if words and words[0] in STAGES and len(words) >= 5:
            rows[words[0]] = words[1:]
    return rows


@pytest.mark.slow
def test_demo_runs_every_stage_then_skips_them_all_quietly(tmp_path):
    from flows.cpu_ops import environment_extensions_dir, shm_op_built

    home = tmp_path / "prefect-home"
    env = {**os.environ, "PREFECT_HOME": str(home), "PYTHONPATH": str(REPO)}
    for variable in ("PREFECT_API_URL", "TORCH_EXTENSIONS_DIR"):
        env.pop(variable, None)
    op_was_built = shm_op_built(environment_extensions_dir())

    def demo() -> str:
        result = subprocess.run([sys.executable, "-m", "flows.demo", "--workdir", str(tmp_path / "w"), "--steps", "2", "--random-assets"],
                                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
        output = result.stdout + result.stderr
        assert result.returncode == 0, output
        assert "Traceback" not in output and "ERROR" not in output, output
        assert processes_with_env("PREFECT_HOME", str(home)) == []  # no server left behind
        return output

    first = demo()
    rows = table_rows(first)
    assert {stage: cells[0] for stage, cells in rows.items()} == dict.fromkeys(STAGES, "ran"), first
    assert all(cells[1] == "1" for cells in rows.values())  # attempts
    assert (tmp_path / "w" / "pipeline" / "average" / "output" / "config.json").is_file()
    building = "building DeepSpeed's CPU communication op" in first
    assert building == (not op_was_built), first
    assert shm_op_built(environment_extensions_dir())

    second = demo()
    assert {stage: cells[0] for stage, cells in table_rows(second).items()} == dict.fromkeys(STAGES, "skipped"), second
    assert "building DeepSpeed's CPU communication op" not in second


KILLS = {  # what is SIGKILLed once the demo's server is up, and how the demo process then ends
    "the demo": ("os.kill(os.getpid(), signal.SIGKILL)", -9),
    "the server's supervisor": ("os.kill(server.process.pid, signal.SIGKILL); server.process.wait(); server.stop()", 0),
}


@pytest.mark.slow
@pytest.mark.parametrize("killed", list(KILLS))
def test_the_demos_server_goes_down_with_the_demo_even_on_sigkill(killed, tmp_path):
    import time

    home = tmp_path / "prefect-home"
    env = {**os.environ, "PREFECT_HOME": str(home), "PYTHONPATH": str(REPO)}
    env.pop("PREFECT_API_URL", None)
    kill, returncode = KILLS[killed]
    script = (
        "import os, signal, sys; from pathlib import Path; from flows.demo import TemporaryServer\n"
        "server = TemporaryServer(Path(sys.argv[1])); server.start(); server.wait_healthy()\n"
        f"print(server.api_url, flush=True); {kill}\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "server.log")], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == returncode and result.stdout.startswith("http://127.0.0.1:"), result.stdout + result.stderr
    deadline = time.monotonic() + 60  # the supervisor's grace period, on a busy machine
    while processes_with_env("PREFECT_HOME", str(home)) and time.monotonic() < deadline:
        time.sleep(1)
    assert processes_with_env("PREFECT_HOME", str(home)) == []


def earlier_demo_folder(workdir: Path) -> dict[str, Path]:
    """What a finished demo leaves: assets, the server's log, stage outputs and markers."""
    files = {
        "asset": workdir / "assets" / "llm" / "config.json",
        "server log": workdir / "prefect-server.log",
        "stage output": workdir / "pipeline" / "recipe-1" / "output" / "adapter_model.safetensors",
        "marker": workdir / "pipeline" / "recipe-1" / "stage-complete.json",
        "validation record": workdir / "pipeline" / ".validation" / "record.json",
    }
    for path in files.values():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("earlier run")
    return files


@pytest.mark.parametrize("fresh", [False, True])
def test_fresh_deletes_the_earlier_runs_outputs_and_keeps_the_rest(tmp_path, monkeypatch, fresh):
    """`--fresh` starts over: the pipeline folder (outputs, completion markers, preflight's
    records) goes; the assets, the server log and anything beside the workdir stay. Without it
    nothing is deleted (the run skips what is complete)."""
    from flows import demo

    workdir = tmp_path / "w"
    files = earlier_demo_folder(workdir)
    beside = tmp_path / "beside.txt"
    beside.write_text("not the demo's")
    runs = []

    def run(args, workdir, output_root, started, server) -> int:  # the pipeline, with what it finds
        runs.append((workdir, output_root, server, sorted(p.relative_to(workdir).as_posix() for p in workdir.rglob("*") if p.is_file())))
        return 0

    monkeypatch.setattr(demo, "_run", run)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # a server of the user's: the demo starts none

    assert demo.main(["--workdir", str(workdir), *(["--fresh"] if fresh else [])]) == 0
    ((ran_in, output_root, server, seen),) = runs
    assert (ran_in, output_root, server) == (workdir, workdir / "pipeline", None)
    deleted = {"stage output", "marker", "validation record"} if fresh else set()
    assert {name for name, path in files.items() if not path.exists()} == deleted
    assert seen == sorted(p.relative_to(workdir).as_posix() for name, p in files.items() if name not in deleted)
    assert beside.read_text() == "not the demo's"
    assert not (workdir / "pipeline").exists() if fresh else (workdir / "pipeline").is_dir()
