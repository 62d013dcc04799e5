"""Fault trials: SIGKILL a random process of a running pipeline, recover as a user would, check.

On the tiny CPU pipeline (`python -m flows.demo`, few steps), each trial:

1. starts the demo in a fresh work folder (the tiny assets are copied, not rebuilt);
2. at a random moment, SIGKILLs one process chosen at random among those of the run's tree
   that exist then: the flow process, a stage supervisor, the deepspeed launcher, a training
   rank, a merge or an average process;
3. lets the run end by itself (a task retry may absorb the kill), then checks that no process
   of the run is left and that every folder that looks complete is complete;
4. recovers the way a user would: runs the same command again in the same folder;
5. checks that the pipeline finishes, that no stage completed before the recovery ran again
   (its complete-marker is unchanged and it has no new attempt log), that no process is left,
   and that the averaged weights equal those of an uninterrupted run with the same seed
   (bit-identical; otherwise the largest absolute difference is printed).

It prints one row per trial and a summary; the exit status is 1 if any trial failed.

    python benchmarks/fault_trials.py --trials 20 --workdir /tmp/fault-trials
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bunny.average import AverageError, _read_bytes, read_checkpoint  # noqa: E402

STAGES = ("pretrain", "recipe-1", "recipe-2", "merge-recipe-1", "merge-recipe-2", "average")
COMPLETE_MARKER = "stage-complete.json"
TRAINING_COMPLETE = "training_complete.json"
KINDS = {  # what a process is, from its command line (first match wins)
    "supervisor": "flows/supervisor.py",
    "launcher": "deepspeed.launcher",
    "rank": "bunny/train/train.py",
    "merge": "bunny.merge",
    "average": "bunny.average",
}
RUN_TIMEOUT = 1800.0
LEFTOVER_GRACE = 15.0  # seconds the supervisors get to reap their groups after the run ends


@dataclass
class Trial:
    index: int
    delay: float
    victim: str = "-"
    interrupted_rc: int | None = None
    recovered_rc: int | None = None
    problems: list[str] = field(default_factory=list)
    max_abs_diff: float | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


def demo_command(workdir: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "flows.demo", "--workdir", str(workdir), "--steps", str(steps)]


def start_demo(workdir: Path, steps: int, log_name: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PREFECT_HOME": str(workdir.parent / "prefect-home"),  # the trials' own Prefect database
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300"}  # a loaded machine starts it slowly
    log = open(workdir / log_name, "ab")
    return subprocess.Popen(demo_command(workdir, steps), cwd=REPO_ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def _proc_children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        if fields and fields[0] != b"Z":
            children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def tree(root: int) -> list[int]:
    """`root` and all its live descendants."""
    children, found, todo = _proc_children(), [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def kind_of(pid: int, flow_pid: int) -> str | None:
    if pid == flow_pid:
        return "flow"
    command = _cmdline(pid)
    return next((kind for kind, needle in KINDS.items() if needle in command), None)


def processes_of_run(workdir: Path) -> list[int]:
    """Live processes whose command line or working folder mentions the run's folder."""
    mine, marker = [], str(workdir)
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            cwd = ""
        if marker in _cmdline(int(entry)) or cwd.startswith(marker):
            state = Path(f"/proc/{entry}/stat").read_bytes() if Path(f"/proc/{entry}/stat").exists() else b""
            if b") Z " not in state:
                mine.append(int(entry))
    return mine


def wait_gone(workdir: Path, extra: set[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        left = sorted(set(processes_of_run(workdir)) | {p for p in extra if Path(f"/proc/{p}").exists()
                                                          and b") Z " not in Path(f"/proc/{p}/stat").read_bytes()})
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def completed_stages(root: Path) -> dict[str, tuple[str, list[str]]]:
    """Stage -> (its complete-marker's text, its attempt logs) for every stage marked complete."""
    done = {}
    for stage in STAGES:
        marker = root / stage / COMPLETE_MARKER
        if marker.is_file():
            logs = sorted(p.name for p in (root / stage / "logs").glob("attempt-*.log"))
            done[stage] = (marker.read_text(), logs)
    return done


def incomplete_looking_complete(root: Path) -> list[str]:
    """Folders that look complete but are not: a marked stage whose output does not hold up."""
    problems = []
    for stage in STAGES:
        output = root / stage / "output"
        marked = (root / stage / COMPLETE_MARKER).is_file()
        if stage.startswith(("merge", "average")) and output.exists():
            try:
                read_checkpoint(output)  # every shard present, none truncated
            except AverageError as exc:
                problems.append(f"{stage}/output exists but is incomplete: {exc}")
        if stage in ("pretrain", "recipe-1", "recipe-2") and (output / TRAINING_COMPLETE).is_file():
            needed = ["mm_projector.bin"] if stage == "pretrain" else ["adapter_model.safetensors",
                                                                      "non_lora_trainables.bin"]
            missing = [name for name in needed if not (output / name).is_file()]
            if missing:
                problems.append(f"{stage}/output has {TRAINING_COMPLETE} but lacks {missing}")
        if marked and not output.exists():
            problems.append(f"{stage} is marked complete but has no output")
    return problems


def averaged_tensors(root: Path) -> dict[str, bytes]:
    checkpoint = read_checkpoint(root / "average" / "output")
    return {name: _read_bytes(entry) for name, entry in checkpoint.tensors.items()}


def max_abs_diff(a: dict[str, bytes], b: dict[str, bytes], root: Path) -> float:
    import torch

    checkpoint = read_checkpoint(root / "average" / "output")
    worst = 0.0
    for name, entry in checkpoint.tensors.items():
        if a[name] != b[name]:
            from bunny.average import SAFETENSORS_DTYPES
            dtype = SAFETENSORS_DTYPES[entry.dtype].torch_dtype
            x = torch.frombuffer(bytearray(a[name]), dtype=dtype).double()
            y = torch.frombuffer(bytearray(b[name]), dtype=dtype).double()
            worst = max(worst, (x - y).abs().max().item())
    return worst


def run_to_end(workdir: Path, steps: int, log_name: str) -> int:
    process = start_demo(workdir, steps, log_name)
    try:
        return process.wait(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        return -1


def run_trial(trial: Trial, base: Path, assets: Path, steps: int, reference: dict[str, bytes],
              rng: random.Random) -> None:
    workdir = base / f"trial-{trial.index:02d}"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    shutil.copytree(assets, workdir / "assets", symlinks=True)
    root = workdir / "pipeline"
    process = start_demo(workdir, steps, "interrupted.log")
    seen: set[int] = set()
    deadline = time.monotonic() + trial.delay
    while time.monotonic() < deadline and process.poll() is None:
        seen.update(tree(process.pid))
        time.sleep(0.2)
    if process.poll() is None:
        members = tree(process.pid)
        seen.update(members)
        candidates = [(pid, kind) for pid in members if (kind := kind_of(pid, process.pid))]
        if candidates:
            pid, kind = rng.choice(candidates)
            trial.victim = kind
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                trial.victim += " (gone)"
    else:
        trial.victim = "(run ended first)"
    try:
        trial.interrupted_rc = process.wait(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        trial.problems.append("the interrupted run did not end")
        os.killpg(process.pid, signal.SIGKILL)
    left = wait_gone(workdir, seen, LEFTOVER_GRACE)
    if left:
        trial.problems.append(f"processes left after the kill: {[(p, _cmdline(p)[:60]) for p in left]}")
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    trial.problems += incomplete_looking_complete(root)
    before = completed_stages(root)

    trial.recovered_rc = run_to_end(workdir, steps, "recovery.log")
    if trial.recovered_rc != 0:
        trial.problems.append(f"the recovery run failed (status {trial.recovered_rc}; see {workdir}/recovery.log)")
    after = completed_stages(root)
    for stage, (marker, logs) in before.items():
        if after.get(stage, (None, None))[0] != marker or after[stage][1] != logs:
            trial.problems.append(f"{stage} was complete before the recovery and ran again")
    left = wait_gone(workdir, set(), LEFTOVER_GRACE)
    if left:
        trial.problems.append(f"processes left after the recovery: {left}")
    trial.problems += incomplete_looking_complete(root)
    if trial.recovered_rc == 0:
        result = averaged_tensors(root)
        if result != reference:
            trial.max_abs_diff = max_abs_diff(result, reference, root)
            trial.problems.append(f"averaged weights differ from the uninterrupted run's "
                                  f"(max |diff| {trial.max_abs_diff:.3g})")
        else:
            trial.max_abs_diff = 0.0
    if trial.ok:
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per training stage")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill schedule")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bunny-fault-trials"))
    args = parser.parse_args(argv)
    base = args.workdir.absolute()
    base.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)

    baseline = base / "baseline"
    shutil.rmtree(baseline, ignore_errors=True)
    baseline.mkdir()
    started = time.monotonic()
    rc = run_to_end(baseline, args.steps, "run.log")
    baseline_seconds = time.monotonic() - started
    if rc != 0:
        print(f"the uninterrupted run failed (status {rc}); see {baseline}/run.log", file=sys.stderr)
        return 1
    reference = averaged_tensors(baseline / "pipeline")
    print(f"uninterrupted run: {baseline_seconds:.0f} s, {len(reference)} averaged tensors", flush=True)
    print(f"{'trial':>5}  {'kill at':>8}  {'victim':<18} {'rc':>4} {'rc2':>4}  {'max|diff|':>9}  result", flush=True)

    trials = []
    for index in range(args.trials):
        # Kill before 85% of the uninterrupted run's time: a run that happens to go faster than
        # the baseline would otherwise end before a late kill (a trial without a fault).
        trial = Trial(index, delay=rng.uniform(2.0, baseline_seconds * 0.85))
        trial_started = time.monotonic()
        run_trial(trial, base, baseline / "assets", args.steps, reference, rng)
        trials.append(trial)
        diff = "-" if trial.max_abs_diff is None else f"{trial.max_abs_diff:.3g}"
        print(f"{index:>5}  {trial.delay:>7.1f}s  {trial.victim:<18} {trial.interrupted_rc!s:>4} "
              f"{trial.recovered_rc!s:>4}  {diff:>9}  {'ok' if trial.ok else 'FAIL: ' + '; '.join(trial.problems)}"
              f"  ({time.monotonic() - trial_started:.0f} s)", flush=True)

    passed = sum(trial.ok for trial in trials)
    victims: dict[str, int] = {}
    for trial in trials:
        victims[trial.victim] = victims.get(trial.victim, 0) + 1
    print(f"\nsummary: {passed}/{len(trials)} trials passed; victims: "
          + ", ".join(f"{k} x{v}" for k, v in sorted(victims.items()))
          + f"; bit-identical averages: {sum(t.max_abs_diff == 0.0 for t in trials)}/{len(trials)}")
    print(json.dumps({"trials": len(trials), "passed": passed, "victims": victims,
                      "baseline_seconds": round(baseline_seconds, 1)}))
    return 0 if passed == len(trials) else 1


if __name__ == "__main__":
    sys.exit(main())
