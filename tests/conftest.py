"""Shared fixtures: an isolated environment and one set of tiny assets per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "bunny" / "train" / "train.py"


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


def run_deepspeed(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus 1 bunny/train/train.py ARGS`` on the CPU, output captured."""
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(_free_port()), str(TRAIN_SCRIPT), *args]
    return subprocess.run(command, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def nested_tensors(tree, prefix: str = "") -> dict:
    """Every tensor in a nested checkpoint structure (dicts, lists), by its path."""
    import torch

    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    return {path: t for key, value in items for path, t in nested_tensors(value, f"{prefix}/{key}").items()}
