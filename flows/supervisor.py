"""Process-group keeper for one stage: `python supervisor.py --grace S -- COMMAND...`.

The flow starts this script as the leader of a new session, so it and every process the
command spawns (deepspeed's launcher, its per-rank workers, their data loaders) share one
process group. The script runs the command and makes sure that group dies with the stage:

* SIGTERM / SIGINT / SIGHUP (a cancel, a timeout, Ctrl-C): SIGTERM to the whole group, which
  lets deepspeed stop remote ranks, then SIGKILL to whatever is left after the grace period;
* the flow process disappearing (crash, SIGKILL, OOM kill): the pipe on our stdin, whose
  only writer is the flow process, reaches end-of-file, and the parent-death signal fires;
  either starts the same shutdown. (PR_SET_PDEATHSIG alone is not enough: it follows the
  thread that spawned us, not the process.)
* the command ending by itself: any process it left in the group is killed.

The exit status is the command's (128 + signal number when a signal ended it). Standard
library only, so it starts in milliseconds and never imports the flow's dependencies.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time

PR_SET_PDEATHSIG = 1
POLL_SECONDS = 0.1


def group_members(pgid: int) -> list[int]:
    """Pids of the live processes in process group `pgid` (Linux /proc)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        # fields after the ")" that closes the command name: state ppid pgrp ...
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != b"Z":
            members.append(int(entry))
    return members


def kill_others(pgid: int, sig: int) -> int:
    """Send `sig` to every member of the group but this process; returns how many got it."""
    count = 0
    for pid in group_members(pgid):
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, sig)
            count += 1
        except ProcessLookupError:
            pass
    return count


def exit_signal(code: int) -> signal.Signals | None:
    """The signal an exit status most likely stands for: -N (Popen), 128 + N (a shell, or this
    supervisor) or 256 - N (deepspeed's launcher exits with its killed rank's -N)."""
    if code < 0:
        number = -code
    elif 128 < code <= 128 + 64:
        number = code - 128
    elif 256 - 64 <= code < 256:
        number = 256 - code
    else:
        return None
    try:
        return signal.Signals(number)
    except ValueError:
        return None


def describe_exit(code: int) -> str:
    """`exited with code 247: killed by SIGKILL (signal 9): likely out of memory`."""
    text = f"exited with code {code}"
    sig = exit_signal(code)
    if sig is not None:
        text += f": killed by {sig.name} (signal {sig.value})"
        if sig is signal.SIGKILL:
            text += ": likely out of memory (the kernel's OOM killer), or killed by hand"
    return text


def say(message: str) -> None:
    """A line in the stage's log; never fails (the reader may be gone with the flow)."""
    try:
        os.write(1, f"[supervisor] {message}\n".encode())
    except OSError:
        pass


class Supervisor:
    def __init__(self, command: list[str], grace: float) -> None:
        self.command = command
        self.grace = grace
        self.pgid = os.getpgid(0)
        self.stopping = threading.Event()
        self.child: subprocess.Popen[bytes] | None = None

    def stop(self, reason: str) -> None:
        """Terminate the group once: SIGTERM, then SIGKILL after the grace period."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        threading.Thread(target=self._terminate_group, daemon=True).start()
        say(f"stopping the stage's processes: {reason}")

    def _terminate_group(self) -> None:
        kill_others(self.pgid, signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        while time.monotonic() < deadline and any(p != os.getpid() for p in group_members(self.pgid)):
            time.sleep(POLL_SECONDS)
        if kill_others(self.pgid, signal.SIGKILL):
            say(f"killed what was left after {self.grace:g} s")

    def _watch_parent(self) -> None:
        while os.read(0, 4096):  # b"" at end-of-file: the flow process is gone
            pass
        self.stop("the flow process went away")

    def run(self, parent_pid: int) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda signum, _frame: self.stop(signal.Signals(signum).name))
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):
            pass  # not Linux: the stdin watch still covers a vanished parent
        if os.getppid() != parent_pid:
            return 128 + signal.SIGTERM  # the parent died before the death signal was armed
        self.child = subprocess.Popen(self.command, stdin=subprocess.DEVNULL)
        threading.Thread(target=self._watch_parent, daemon=True).start()
        code = self.child.wait()
        if self.stopping.is_set():
            # give the shutdown thread its grace period to finish off stragglers
            deadline = time.monotonic() + self.grace + 1
            while time.monotonic() < deadline and any(p != os.getpid() for p in group_members(self.pgid)):
                time.sleep(POLL_SECONDS)
        kill_others(self.pgid, signal.SIGKILL)
        if code != 0 and not self.stopping.is_set():
            say(f"the command {describe_exit(code)}")
        return code if code >= 0 else 128 - code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grace", type=float, default=30.0, help="SIGTERM to SIGKILL delay")
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")
    if os.getpgid(0) != os.getpid():
        parser.error("must be started as a process group leader (start_new_session=True)")
    return Supervisor(command, args.grace).run(args.parent_pid)


if __name__ == "__main__":
    sys.exit(main())
