"""Master ports that stay distinct across every process on the host.

A port is chosen long before torch.distributed binds it (deepspeed imports, spawns ranks,
then rank 0 listens), so a "free now" check alone lets two pipeline runs on one host pick the
same port. Two defences:

* `HostPorts.reserve` holds an exclusive `flock` on `<lock_dir>/<port>.lock` from the choice
  until the stage ends. Every flow process of every run on the host skips a locked port, and
  the kernel drops the lock when its holder dies, so a crash never leaks a reservation.
* A process outside the pipeline can still take the port in the window before the bind:
  `run_on_free_port` recognises the launcher's `EADDRINUSE` failure and relaunches on another
  port inside the same task attempt, so no retry (and no retry delay) is spent on it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from flows.launcher import StageProcessError

PORT_SEARCH_SPAN = 200
PORT_COLLISION_RELAUNCHES = 5
LOCK_DIR_ENV = "BUNNY_PORT_LOCK_DIR"
PORT_IN_USE = re.compile(r"EADDRINUSE|address already in use", re.IGNORECASE)

T = TypeVar("T")


def default_lock_dir() -> Path:
    """Host-wide (every user and virtualenv of the host shares /tmp); overridable."""
    return Path(os.environ.get(LOCK_DIR_ENV) or Path(tempfile.gettempdir()) / "bunny-master-ports")


def bindable(port: int) -> bool:
    """Nothing listens on `port` right now (on any interface)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("", port))
        except OSError:
            return False
    return True


class HostPorts:
    """Master ports reserved host-wide with one lock file per port."""

    def __init__(self, lock_dir: Path | None = None) -> None:
        self._lock_dir = lock_dir
        self._guard = threading.Lock()

    @property
    def lock_dir(self) -> Path:
        return self._lock_dir or default_lock_dir()

    def _try_lock(self, port: int) -> int | None:
        """An fd holding the port's lock, or None if another holder has it."""
        folder = self.lock_dir
        if not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(PermissionError):
                folder.chmod(0o1777)  # shared by every user of the host, like /tmp
        path = folder / f"{port}.lock"
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                return None
            raise
        return fd

    @contextlib.contextmanager
    def reserve(self, preferred: int, avoid: frozenset[int] = frozenset()) -> Iterator[int]:
        """The first port from `preferred` up that no process of the host has reserved, that
        nothing listens on, and that is not in `avoid`; reserved until the block ends."""
        with self._guard:
            for port in range(preferred, preferred + PORT_SEARCH_SPAN):
                if port in avoid:
                    continue
                fd = self._try_lock(port)
                if fd is None:
                    continue
                if bindable(port):
                    break
                os.close(fd)
            else:
                raise RuntimeError(
                    f"no free master port in {preferred}..{preferred + PORT_SEARCH_SPAN - 1} "
                    f"(reservations in {self.lock_dir})"
                )
        try:
            yield port
        finally:
            os.close(fd)  # closing the only fd on the lock releases it


def master_port_in_use(error: StageProcessError) -> bool:
    """The launch failed because its master port was taken before rank 0 could bind it."""
    return any(PORT_IN_USE.search(line) for line in error.tail)


def run_on_free_port(
    ports: HostPorts,
    preferred: int,
    run: Callable[[int], T],
    on_collision: Callable[[int], None] | None = None,
    relaunches: int = PORT_COLLISION_RELAUNCHES,
) -> T:
    """`run(port)` on a reserved port; when it fails with the port already in use, again on
    the next free port (up to `relaunches` times), never reusing a port that collided."""
    collided: set[int] = set()
    while True:
        with ports.reserve(preferred, frozenset(collided)) as port:
            try:
                return run(port)
            except StageProcessError as error:
                if len(collided) >= relaunches or not master_port_in_use(error):
                    raise
                collided.add(port)
        if on_collision is not None:
            on_collision(port)


HOST_PORTS = HostPorts()
