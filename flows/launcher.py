"""Run a stage's command as a supervised child process group, with its log and its limits.

`run_supervised` starts `flows/supervisor.py` as a new session leader, which runs the command
(a deepspeed launch, a merge, an average) inside that session's process group, so the whole
tree can be stopped at once. Every output line is appended to the attempt's log file; a
throttled digest goes to the Prefect run logger; `on_tick` runs every few seconds (progress
artifacts). A non-zero exit raises `StageProcessError` carrying the log's tail; a timeout stops
the group and raises `StageTimeout`.

Every running launch is registered here: `stop_all` (called by the flow's cancellation and
crash hooks and its SIGTERM/SIGINT handling) stops them all and refuses new launches until
`allow_launches` (so a task retry cannot start a stage while the flow goes down). If the flow
process dies without running any of that, the supervisors notice on their own (see
`flows.supervisor`).
"""

from __future__ import annotations

import collections
import logging
import shlex
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from flows.supervisor import describe_exit

SUPERVISOR = Path(__file__).with_name("supervisor.py")
PROJECT_ROOT = Path(__file__).resolve().parents[1]
TAIL_LINES = 40
FORWARDED_LINES = 8
SUPERVISOR_EXTRA_SECONDS = 5.0  # beyond the grace period, before the flow kills the group itself

LoggerLike = logging.Logger | logging.LoggerAdapter


class StageProcessError(RuntimeError):
    """A stage's command failed; the message ends with the last lines of its log."""

    def __init__(self, name: str, reason: str, log_path: Path, tail: Sequence[str]) -> None:
        self.log_path = log_path
        self.tail = list(tail)
        text = "".join(self.tail).rstrip()
        super().__init__(f"{name}: {reason}; full log: {log_path}\n--- last lines ---\n{text}")


class StageTimeout(StageProcessError):
    """A stage ran past its timeout and its process group was stopped."""


class StageStopped(StageProcessError):
    """A stage was stopped (or not started) because its flow run is ending."""


@dataclass(frozen=True)
class LaunchResult:
    log_path: Path
    seconds: float


class Launch:
    """One supervised child: its process, log file, tail, and how to stop it."""

    def __init__(self, name: str, command: Sequence[str], log_path: Path, env: Mapping[str, str],
                 grace: float, cwd: Path | None) -> None:
        self.name = name
        self.log_path = log_path
        self.grace = grace
        self.stop_reason: str | None = None
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._unsent: collections.deque[str] = collections.deque(maxlen=FORWARDED_LINES)
        self._unsent_count = 0
        self._lock = threading.Lock()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "a", encoding="utf-8", buffering=1)
        self._log.write(f"$ {shlex.join(command)}\n")
        supervised = [sys.executable, str(SUPERVISOR), "--grace", str(grace),
                      "--parent-pid", str(os.getpid()), "--", *command]
        try:
            self.process = subprocess.Popen(
                supervised, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                start_new_session=True, env=dict(env), cwd=cwd,
            )
        except BaseException:
            self._log.close()
            raise
        self._reader = threading.Thread(target=self._read, name=f"{name}-log", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        try:
            for raw in self.process.stdout:
                line = raw.decode("utf-8", errors="replace")
                self._log.write(line)
                shown = line.rstrip("\r\n").rsplit("\r", 1)[-1] + "\n"  # what a terminal shows of it
                with self._lock:
                    self.tail.append(shown)
                    self._unsent.append(shown)
                    self._unsent_count += 1
        except (OSError, ValueError):
            pass  # the pipe or the log was closed under us while stopping

    def take_unsent(self) -> tuple[list[str], int]:
        """Lines not yet forwarded (the newest few) and how many there were in all."""
        with self._lock:
            lines, count = list(self._unsent), self._unsent_count
            self._unsent.clear()
            self._unsent_count = 0
        return lines, count

    def stop(self, reason: str) -> None:
        """Ask the supervisor to stop the group (non-blocking; `wait_stopped` finishes it)."""
        if self.stop_reason is None:
            self.stop_reason = reason
        if self.process.poll() is None:
            try:
                self.process.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass

    def wait_stopped(self) -> None:
        """Wait for the supervisor (killing the whole group ourselves if it does not exit in
        time), then for the last lines of the log."""
        try:
            self.process.wait(timeout=self.grace + SUPERVISOR_EXTRA_SECONDS)
        except subprocess.TimeoutExpired:
            kill_group(self.process.pid)
            self.process.wait()
        self._reader.join(timeout=SUPERVISOR_EXTRA_SECONDS)

    def close(self) -> None:
        self._reader.join(timeout=SUPERVISOR_EXTRA_SECONDS)
        if self.process.stdin is not None:
            self.process.stdin.close()
        self._log.close()


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def kill_orphaned_group(leader: subprocess.Popen) -> None:
    """Kill what is left of the group of a supervisor (`leader`, started with
    `start_new_session=True`) that was itself killed by a signal (SIGKILL by hand, the OOM
    killer): it could not stop its group, which would otherwise live on without it."""
    if leader.returncode is not None and leader.returncode < 0:
        kill_group(leader.pid)


_ACTIVE: dict[int, Launch] = {}
_ACTIVE_LOCK = threading.Lock()
_STOPPING = threading.Event()
STOP_REASON_PREFIX = "stopped by the flow: "


def active_launches() -> list[Launch]:
    with _ACTIVE_LOCK:
        return list(_ACTIVE.values())


def stopping() -> bool:
    """True between `stop_all` and `allow_launches`: the flow run is going down."""
    return _STOPPING.is_set()


def allow_launches() -> None:
    """Accept launches again (a new flow run starts in this process)."""
    _STOPPING.clear()


def stop_all(reason: str, wait: bool = False) -> int:
    """Stop every running launch of this process and refuse new ones until `allow_launches`;
    with `wait`, return once their process groups are gone."""
    with _ACTIVE_LOCK:
        _STOPPING.set()
        launches = list(_ACTIVE.values())
    for launch in launches:
        launch.stop(STOP_REASON_PREFIX + reason)
    if wait:
        for launch in launches:
            launch.wait_stopped()
    return len(launches)


def child_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment, with the project importable and output unbuffered."""
    env = dict(os.environ)
    paths = [str(PROJECT_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def run_supervised(
    name: str,
    command: Sequence[str],
    log_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float | None = None,
    grace: float = 30.0,
    on_tick: Callable[[], None] | None = None,
    tick_seconds: float = 10.0,
    log_interval: float = 15.0,
    logger: LoggerLike | None = None,
) -> LaunchResult:
    """Run `command` (an argument list, never a shell string) to completion under a supervisor."""
    logger = logger or logging.getLogger(__name__)
    started = time.monotonic()
    deadline = started + timeout if timeout else None
    with _ACTIVE_LOCK:
        if _STOPPING.is_set():
            raise StageStopped(name, "not started: the flow run is stopping", log_path, [])
        launch = Launch(name, command, log_path, child_environment(env), grace, cwd)
        _ACTIVE[launch.process.pid] = launch
    last_forward = started
    tick_failed = False
    try:
        while True:
            wait_for = tick_seconds if deadline is None else min(tick_seconds, deadline - time.monotonic())
            try:
                launch.process.wait(timeout=max(0.0, wait_for))
                break
            except subprocess.TimeoutExpired:
                pass
            if deadline is not None and time.monotonic() >= deadline:
                launch.stop(f"timeout after {timeout:g} s")
                launch.wait_stopped()
                break
            if on_tick is not None:
                try:
                    on_tick()
                except Exception as exc:  # progress reporting must never stop training
                    if not tick_failed:
                        logger.warning("%s: progress update failed: %s", name, exc)
                    tick_failed = True
            if time.monotonic() - last_forward >= log_interval:
                _forward(launch, logger)
                last_forward = time.monotonic()
    finally:
        if launch.process.poll() is None:
            launch.stop("the stage's task was interrupted")
            launch.wait_stopped()
        kill_orphaned_group(launch.process)  # else its launcher and ranks train on beside the retry
        with _ACTIVE_LOCK:
            _ACTIVE.pop(launch.process.pid, None)
        launch.close()
    _forward(launch, logger)
    code = launch.process.returncode
    reason = launch.stop_reason
    if reason is not None:
        error = StageStopped if reason.startswith(STOP_REASON_PREFIX) else StageTimeout
        raise error(name, f"stopped ({reason.removeprefix(STOP_REASON_PREFIX)})", log_path, launch.tail)
    if code != 0:
        raise StageProcessError(name, describe_exit(code), log_path, launch.tail)
    return LaunchResult(log_path, time.monotonic() - started)


def _forward(launch: Launch, logger: LoggerLike) -> None:
    lines, count = launch.take_unsent()
    if not lines:
        return
    skipped = f" ({count - len(lines)} earlier lines in {launch.log_path})" if count > len(lines) else ""
    logger.info("%s%s:\n%s", launch.name, skipped, "".join(lines).rstrip())
