"""Shared fixtures: an isolated environment and one set of tiny assets per test session."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "bunny" / "train" / "train.py"
SERVER_START_TIMEOUT = 300.0  # seconds; a busy machine can take minutes


@pytest.fixture(scope="session", autouse=True)
def isolated_environment(tmp_path_factory):
    """No hub, no telemetry, a private Prefect home: tests never touch the user's state."""
    home = tmp_path_factory.mktemp("prefect-home")
    os.environ.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    yield


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    from bunny.tiny import make_tiny_assets

    return make_tiny_assets(tmp_path_factory.mktemp("tiny") / "assets", seed=0)


@dataclass(frozen=True)
class PrefectServer:
    api_url: str
    home: Path  # the server's PREFECT_HOME (its database and log)

    def client_env(self, **extra: str) -> dict[str, str]:
        """Environment of a client process (CLI, worker, flow run) of this server."""
        return {**os.environ, "PREFECT_HOME": str(self.home), "PREFECT_API_URL": self.api_url, **extra}


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """One real Prefect server (`prefect server start`: own PREFECT_HOME and SQLite database, a
    free port) for every slow test that needs one: a start costs 15-20 s on two busy cores.
    Tests stay apart by their own names (work pools, deployments, flow runs, artifact keys)."""
    from flows.demo import server_healthy

    home = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    with open(home / "server.log", "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while not server_healthy(api_url.removesuffix("/api")):
            assert server.poll() is None, (home / "server.log").read_text()
            assert time.monotonic() < deadline, "the Prefect server did not start"
            time.sleep(0.5)
        yield PrefectServer(api_url=api_url, home=home)
    finally:
        stop_group(server)


@pytest.fixture(scope="module")
def prefect_api(prefect_server):
    """This module's in-process Prefect client (flows, artifacts) talks to the session's server,
    as under `prefect_test_harness`; what it queued is sent before the next module."""
    import prefect.context
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_server.api_url}):
        with prefect.context._temporary_global_settings_context(prefect.context.get_settings_context()):
            yield prefect_server
            APILogWorker.drain_all(timeout=60)
            EventsWorker.drain_all(timeout=60)


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to a process started with `start_new_session=True` and its children, SIGKILL after 20 s."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def run_deepspeed(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus 1 bunny/train/train.py ARGS`` on the CPU, output captured."""
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(_free_port()), str(TRAIN_SCRIPT), *args]
    return subprocess.run(command, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def split_heldout(tiny_assets, folder: Path):
    """The tiny held-out file cut in two eval sets: (validation, test)."""
    import json

    from flows.config import EvalSet

    records = json.loads(tiny_assets.heldout_data.read_text())
    half = len(records) // 2
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "validation.json").write_text(json.dumps(records[:half]))
    (folder / "test.json").write_text(json.dumps(records[half:]))
    images = tiny_assets.finetune_images
    return (EvalSet(name="validation", data_path=folder / "validation.json", image_folder=images),
            EvalSet(name="test", data_path=folder / "test.json", image_folder=images))


def nested_tensors(tree, prefix: str = "") -> dict:
    """Every tensor in a nested checkpoint structure (dicts, lists), by its path."""
    import torch

    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    return {path: t for key, value in items for path, t in nested_tensors(value, f"{prefix}/{key}").items()}


def fill_the_disk_after(monkeypatch, room: int) -> None:
    """A disk that fills up: writes (``os.pwrite``, how ``bunny.fsutil.DirectFile`` writes
    shards) fail with ENOSPC once ``room`` bytes are written, and closing a file written to
    fails too, as the kernel reports a full disk twice."""
    real_pwrite, real_close, written_to = os.pwrite, os.close, set()

    def pwrite(fd, data, offset):
        nonlocal room
        written_to.add(fd)
        size = memoryview(data).nbytes
        if size > room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "(write)")
        room -= size
        return real_pwrite(fd, data, offset)

    def close(fd):
        real_close(fd)
        if fd in written_to:  # its number may be reused once closed
            written_to.discard(fd)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "(close)")

    monkeypatch.setattr(os, "pwrite", pwrite)
    monkeypatch.setattr(os, "close", close)
