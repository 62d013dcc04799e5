"""Master ports: reserved host-wide across processes, and a launch that loses its port to an
outside process is relaunched on another one within the same attempt."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from flows.launcher import StageProcessError, allow_launches, run_supervised
from flows.ports import HostPorts, run_on_free_port

REPO = Path(__file__).resolve().parents[1]

# Another flow process on the host: reserves from PORT, prints the port it got, holds it until
# its stdin closes (or it is killed).
HOLDER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from flows.ports import HostPorts
    with HostPorts(Path(sys.argv[1])).reserve(int(sys.argv[2])) as port:
        print(port, flush=True)
        sys.stdin.read()
    """
)

# What rank 0 of a deepspeed launch does with its master port: torch.distributed's TCPStore.
RANK_ZERO = "import sys, datetime, torch.distributed as d; d.TCPStore('127.0.0.1', int(sys.argv[1]), 1, True, datetime.timedelta(seconds=5)); print('bound', sys.argv[1])"


@pytest.fixture(autouse=True)
def launches_allowed():
    allow_launches()


def free_base_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def start_holder(lock_dir: Path, preferred: int) -> tuple[subprocess.Popen, int]:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock_dir), str(preferred)], cwd=REPO,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = holder.stdout.readline()
    assert line.strip().isdigit(), line
    return holder, int(line)


def test_a_port_reserved_by_another_process_is_skipped_until_it_ends(tmp_path):
    base = free_base_port()
    holder, held = start_holder(tmp_path, base)
    try:
        assert held == base  # nothing listens on it yet: only the reservation protects it
        with HostPorts(tmp_path).reserve(base) as mine:
            assert mine != held
    finally:
        holder.kill()  # no clean-up runs: the kernel drops the lock with the process
        holder.wait()
    with HostPorts(tmp_path).reserve(base) as again:
        assert again == base


def test_reservations_in_one_process_are_distinct_and_skip_listening_ports(tmp_path):
    ports = HostPorts(tmp_path)
    with socket.socket() as listener:
        listener.bind(("", 0))
        listener.listen()
        busy = listener.getsockname()[1]
        with ports.reserve(busy) as first, ports.reserve(busy) as second:
            assert busy not in (first, second) and first != second
    with ports.reserve(first) as again:
        assert again == first


def test_port_taken_before_the_bind_is_relaunched_on_another_port_in_the_same_attempt(tmp_path):
    """An outside job grabs the reserved port in the window before rank 0 binds it: the real
    EADDRINUSE from torch is recognised and the launch runs again, appending to one log."""
    log = tmp_path / "attempt-1.log"
    squatters: list[socket.socket] = []
    collisions: list[int] = []

    def launch(port: int):
        if not squatters:  # the first launch loses its port
            squatter = socket.socket()
            squatter.bind(("", port))
            squatter.listen()
            squatters.append(squatter)
        return run_supervised("recipe-1", [sys.executable, "-c", RANK_ZERO, str(port)], log)

    try:
        base = free_base_port()
        run_on_free_port(HostPorts(tmp_path), base, launch, collisions.append)
        taken = squatters[0].getsockname()[1]
    finally:
        for squatter in squatters:
            squatter.close()
    assert collisions == [taken]
    text = log.read_text()
    assert text.count("$ ") == 2 and "EADDRINUSE" in text
    assert f"bound {taken}" not in text and "bound " in text


def test_other_failures_are_not_relaunched(tmp_path):
    calls: list[int] = []

    def launch(port: int):
        calls.append(port)
        return run_supervised("s", [sys.executable, "-c", "import sys; print('CUDA out of memory'); sys.exit(1)"],
                              tmp_path / "a.log")

    with pytest.raises(StageProcessError, match="out of memory"):
        run_on_free_port(HostPorts(tmp_path), free_base_port(), launch)
    assert len(calls) == 1


def test_relaunches_are_bounded(tmp_path):
    calls: list[int] = []

    def always_taken(port: int):
        calls.append(port)
        raise StageProcessError("s", "exited with code 1", tmp_path / "x.log", ["EADDRINUSE: address already in use\n"])

    with pytest.raises(StageProcessError):
        run_on_free_port(HostPorts(tmp_path), free_base_port(), always_taken, relaunches=2)
    assert len(calls) == 3 and len(set(calls)) == 3
