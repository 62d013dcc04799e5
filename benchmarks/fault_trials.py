"""Fault trials: SIGKILL a random process of a running pipeline, recover as a user would, check.

On the tiny CPU pipeline (the demo's config, few steps), the script first runs the pipeline
uninterrupted and watches which kinds of process live when. Then each trial:

1. starts the pipeline in a fresh work folder (the tiny assets are copied, not rebuilt);
2. SIGKILLs one process of the run's tree at a random moment of the life of the kind drawn for
   the trial: the flow process, a stage supervisor, the deepspeed launcher, a training rank, a
   merge or an average process (every kind is drawn at least twice in 12+ trials). The moment
   is an offset drawn in that kind's life in the uninterrupted run, counted from the kind's
   first appearance in the trial (a loaded trial runs slower than the reference: counted from
   the trial's start, most kills would land in pretrain). For a share of the training kills
   (supervisor, launcher, rank; `--after-checkpoint-share`) the moment is instead "once the
   training stage drawn for the trial (pretrain or a recipe) has saved a complete mid-stage
   checkpoint", and the victim is a process of that stage: the recovery must resume from it;
3. lets the run end by itself (a task retry may absorb the kill), then checks that no process
   of the run is left and that every folder that looks complete is complete;
4. recovers the way a user would: runs the same command again in the same folder, or, for
   some trials whose flow process survived, `prefect flow-run retry RUN --entrypoint ...`
   against the run's own Prefect database;
5. checks that the pipeline finishes, that no stage completed before the recovery ran again
   (its complete-marker is unchanged and it has no new attempt log), that no process is left,
   and that the averaged weights equal those of an uninterrupted run with the same seed
   (bit-identical; otherwise the largest absolute difference is printed).

The runs skip the evaluate stage (it scores the models, it writes nothing the average needs)
unless `--evaluate`, which runs `python -m flows.demo` itself. `--jobs 2` runs two trials at a
time, each in its own folder with its own Prefect database.

It prints one row per trial and a summary; the exit status is 1 if any trial failed.

    python benchmarks/fault_trials.py --trials 20 --steps 2 --jobs 2 --workdir /tmp/fault-trials
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bunny.average import AverageError, _read_bytes, read_checkpoint  # noqa: E402

STAGES = ("pretrain", "recipe-1", "recipe-2", "merge-recipe-1", "merge-recipe-2", "average")
COMPLETE_MARKER = "stage-complete.json"
TRAINING_COMPLETE = "training_complete.json"
VICTIM_KINDS = ("flow", "supervisor", "launcher", "rank", "merge", "average")
TRAINING_KINDS = ("supervisor", "launcher", "rank")  # their command lines name the stage's folder
TRAINING_STAGES = STAGES[:3]
CHECKPOINT = re.compile(r"^checkpoint-\d+$")
KINDS = {  # what a process is, from its command line (first match wins)
    "supervisor": "flows/supervisor.py",
    "launcher": "deepspeed.launcher",
    "rank": "bunny/train/train.py",
    "merge": "bunny.merge",
    "average": "bunny.average",
}
FLOW_ENTRYPOINT = "flows/pipeline.py:bunny_pipeline"
RUN_TIMEOUT = 1800.0
LEFTOVER_GRACE = 15.0  # seconds the supervisors get to reap their groups after the run ends
WATCH_SECONDS = 0.2


@dataclass
class Trial:
    index: int
    kind: str  # the kind of process drawn to be killed
    delay: float  # seconds after the kind's first appearance before which nothing is killed
    recovery: str  # "re-run" or "retry"
    checkpointed: str | None = None  # kill a process of this training stage once it has saved a checkpoint
    victim: str = "-"
    killed_at: float | None = None
    interrupted_rc: int | None = None
    recovered_rc: int | None = None
    redone: list[str] = field(default_factory=list)  # stages the recovery ran
    resumed: list[str] = field(default_factory=list)  # training stages that resumed from a checkpoint
    problems: list[str] = field(default_factory=list)
    max_abs_diff: float | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems


def environment(workdir: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PREFECT_HOME": str(workdir / "prefect-home"),  # the run's own Prefect database
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300"}  # a loaded machine starts it slowly


def pipeline_command(workdir: Path, steps: int, evaluate: bool) -> list[str]:
    if evaluate:
        return [sys.executable, "-m", "flows.demo", "--workdir", str(workdir), "--steps", str(steps)]
    return [sys.executable, __file__, "--run-pipeline", str(workdir), "--steps", str(steps)]


def start(command: list[str], workdir: Path, log_name: str) -> subprocess.Popen:
    (workdir / "prefect-home").mkdir(exist_ok=True)
    log = open(workdir / log_name, "ab")
    return subprocess.Popen(command, cwd=REPO_ROOT, env=environment(workdir), stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def run_pipeline(workdir: Path, steps: int) -> int:
    """The trials' flow process: the demo's pipeline without its evaluate stage."""
    from flows.demo import TemporaryServer, _send_queued_logs_and_events

    server = TemporaryServer(workdir / "prefect-server.log")
    server.start()
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        from bunny.tiny import make_tiny_assets
        from flows.config import PipelineConfig
        from flows.pipeline import bunny_pipeline

        config = PipelineConfig.demo(make_tiny_assets(workdir / "assets"), workdir / "pipeline", steps=steps)
        server.wait_healthy()
        try:
            bunny_pipeline(config)
        except Exception as exc:
            print(f"The pipeline failed: {str(exc).splitlines()[0]}", file=sys.stderr)
            return 1
        return 0
    finally:
        _send_queued_logs_and_events()
        server.stop()


def retry_flow_run(workdir: Path, run_name: str) -> int:
    """`prefect flow-run retry` on the run's own database, under a temporary server."""
    from flows.demo import TemporaryServer

    server = TemporaryServer(workdir / "prefect-server.log")
    server.start()
    try:
        server.wait_healthy()
        env = {**os.environ, "PREFECT_API_URL": server.api_url}
        command = [sys.executable, "-m", "prefect", "flow-run", "retry", run_name, "--entrypoint", FLOW_ENTRYPOINT]
        return subprocess.call(command, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL)
    finally:
        server.stop()


def _stat_fields(pid: int) -> list[bytes] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2:].split()  # state ppid pgrp ... (field 3 on)


def identity(pid: int) -> tuple[int, int] | None:
    """(pid, start time): stays unique when a pid is reused."""
    fields = _stat_fields(pid)
    return None if fields is None or fields[0] == b"Z" else (pid, int(fields[19]))


def _proc_children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat_fields(int(entry))) and fields[0] != b"Z":
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
    if "prefect server start" in command:
        return None  # the temporary Prefect server and its supervisor: not a stage's process
    return next((kind for kind, needle in KINDS.items() if needle in command), None)


def alive(identities: set[tuple[int, int]]) -> list[tuple[int, int]]:
    return sorted(i for i in identities if identity(i[0]) == i)


def processes_of_run(workdir: Path) -> set[tuple[int, int]]:
    """Live processes whose command line or working folder mentions the run's folder."""
    mine, marker = set(), str(workdir) + "/"
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd") + "/"
        except OSError:
            cwd = ""
        if (marker in _cmdline(int(entry)) + " " or cwd.startswith(marker)) and (i := identity(int(entry))):
            mine.add(i)
    return mine


def wait_gone(workdir: Path, seen: set[tuple[int, int]], timeout: float) -> list[tuple[int, int]]:
    deadline = time.monotonic() + timeout
    while True:
        left = sorted(processes_of_run(workdir) | set(alive(seen)))
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def kill_left(left: list[tuple[int, int]]) -> None:
    for pid, started in left:
        if identity(pid) == (pid, started):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def describe(left: list[tuple[int, int]]) -> str:
    return str([(pid, _cmdline(pid)[:80]) for pid, _ in left])


def completed_stages(root: Path) -> dict[str, tuple[str, list[str]]]:
    """Stage -> (its complete-marker's text, its attempt logs) for every stage marked complete."""
    done = {}
    for stage in STAGES:
        marker = root / stage / COMPLETE_MARKER
        if marker.is_file():
            done[stage] = (marker.read_text(), attempt_logs(root, stage))
    return done


def attempt_logs(root: Path, stage: str) -> list[str]:
    return sorted(p.name for p in (root / stage / "logs").glob("attempt-*.log"))


def has_checkpoint(root: Path, stage: str) -> bool:
    """Whether a training stage still running has saved a complete mid-stage checkpoint (the
    trainer writes its trainer_state.json last)."""
    output = root / stage / "output"
    if (root / stage / COMPLETE_MARKER).exists() or (output / TRAINING_COMPLETE).exists() or not output.is_dir():
        return False
    return any(CHECKPOINT.match(p.name) and (p / "trainer_state.json").is_file() for p in output.iterdir())


def processes_of_checkpointed_stage(pids: list[int], root: Path, stage: str) -> list[int]:
    """Those of `pids` whose command line names `stage`'s folder, once it has a checkpoint."""
    if not has_checkpoint(root, stage):
        return []
    folder = str(root / stage) + os.sep
    return [pid for pid in pids if folder in _cmdline(pid)]


def resumed_stages(root: Path) -> list[str]:
    """Training stages one of whose attempts resumed from a checkpoint."""
    return [stage for stage in STAGES[:3]
            if any("resuming from" in log.read_text(errors="replace") for log in (root / stage / "logs").glob("attempt-*.log"))]


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

    from bunny.average import SAFETENSORS_DTYPES

    checkpoint = read_checkpoint(root / "average" / "output")
    worst = 0.0
    for name, entry in checkpoint.tensors.items():
        if name not in b:
            return float("inf")
        if a[name] != b[name]:
            dtype = SAFETENSORS_DTYPES[entry.dtype].torch_dtype
            x = torch.frombuffer(bytearray(a[name]), dtype=dtype).double()
            y = torch.frombuffer(bytearray(b[name]), dtype=dtype).double()
            worst = max(worst, (x - y).abs().max().item())
    return worst


def watch(process: subprocess.Popen, seen: set[tuple[int, int]], lives: dict[str, list[float]] | None = None,
          started: float | None = None) -> int:
    """Wait for `process`, adding every member of its tree to `seen` (and, given `lives`, the first
    and last moment each kind of process was alive); its exit status, -1 after RUN_TIMEOUT."""
    started = time.monotonic() if started is None else started
    while process.poll() is None:
        now = time.monotonic() - started
        if now > RUN_TIMEOUT:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return -1
        for pid in tree(process.pid):
            if (i := identity(pid)) is not None:
                seen.add(i)
                if lives is not None and (kind := kind_of(pid, process.pid)):
                    life = lives.setdefault(kind, [now, now])
                    life[1] = now
        time.sleep(WATCH_SECONDS)
    return process.returncode


def flow_run_name(log: Path) -> str | None:
    found = re.findall(r"Flow run '([\w-]+)'", log.read_text(errors="replace"))
    return found[0] if found else None


def run_trial(trial: Trial, base: Path, assets: Path, steps: int, evaluate: bool, reference: dict[str, bytes],
              rng: random.Random) -> None:
    started = time.monotonic()
    workdir = base / f"trial-{trial.index:02d}"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    shutil.copytree(assets, workdir / "assets", symlinks=True)
    root = workdir / "pipeline"
    process = start(pipeline_command(workdir, steps, evaluate), workdir, "interrupted.log")
    seen: set[tuple[int, int]] = set()
    first_seen: float | None = None  # when a process of the drawn kind first appeared
    while process.poll() is None:  # from the drawn moment on, kill the first process of the drawn kind
        now = time.monotonic() - started
        members = tree(process.pid)
        seen.update(i for pid in members if (i := identity(pid)))
        candidates = [pid for pid in members if kind_of(pid, process.pid) == trial.kind]
        if candidates and first_seen is None:
            first_seen = now
        if trial.checkpointed:
            candidates = processes_of_checkpointed_stage(candidates, root, trial.checkpointed)
        if candidates and (trial.checkpointed or now >= first_seen + trial.delay):
            pid = rng.choice(candidates)
            trial.victim, trial.killed_at = trial.kind, now
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                trial.victim += " (gone)"
            break
        time.sleep(WATCH_SECONDS)
    else:
        trial.victim = "(none alive)"
    trial.interrupted_rc = watch(process, seen)
    if trial.interrupted_rc == -1:
        trial.problems.append("the interrupted run did not end")
    left = wait_gone(workdir, seen, LEFTOVER_GRACE)
    if left:
        trial.problems.append(f"processes left after the kill: {describe(left)}")
        kill_left(left)
    trial.problems += incomplete_looking_complete(root)
    before = completed_stages(root)
    logs_before = {stage: attempt_logs(root, stage) for stage in STAGES}

    run_name = flow_run_name(workdir / "interrupted.log") if trial.recovery == "retry" else None
    if trial.recovery == "retry" and (trial.kind == "flow" or run_name is None):
        trial.recovery = "re-run"  # a SIGKILLed flow process leaves its run "Running": not retryable
    if trial.recovery == "retry":
        command = [sys.executable, __file__, "--retry", str(workdir), run_name]
    else:
        command = pipeline_command(workdir, steps, evaluate)
    seen = set()
    trial.recovered_rc = watch(start(command, workdir, "recovery.log"), seen)
    if trial.recovered_rc != 0:
        trial.problems.append(f"the recovery failed (status {trial.recovered_rc}; see {workdir}/recovery.log)")
    after = completed_stages(root)
    trial.redone = [stage for stage in STAGES if attempt_logs(root, stage) != logs_before[stage]]
    for stage, (marker, logs) in before.items():
        if after.get(stage, (None, None))[0] != marker or after[stage][1] != logs:
            trial.problems.append(f"{stage} was complete before the recovery and ran again")
    left = wait_gone(workdir, seen, LEFTOVER_GRACE)
    if left:
        trial.problems.append(f"processes left after the recovery: {describe(left)}")
        kill_left(left)
    trial.problems += incomplete_looking_complete(root)
    if trial.recovered_rc == 0:
        try:
            result = averaged_tensors(root)
        except (AverageError, OSError) as exc:
            trial.problems.append(f"no averaged model after the recovery: {exc}")
        else:
            trial.max_abs_diff = 0.0 if result == reference else max_abs_diff(result, reference, root)
            if trial.max_abs_diff != 0.0:
                trial.problems.append(f"averaged weights differ from the uninterrupted run's "
                                      f"(max |diff| {trial.max_abs_diff:.3g})")
    trial.resumed = resumed_stages(root)
    trial.seconds = time.monotonic() - started
    if trial.ok:  # keep the logs only
        shutil.rmtree(workdir / "assets", ignore_errors=True)
        for output in root.glob("*/output"):
            shutil.rmtree(output, ignore_errors=True)


def schedule(count: int, lives: dict[str, list[float]], rng: random.Random, retry_share: float,
             after_checkpoint_share: float, victim_kinds: tuple[str, ...] = VICTIM_KINDS) -> list[Trial]:
    """Each trial's kind (every kind twice while trials last, then uniformly drawn, shuffled), a
    moment drawn in that kind's life in the uninterrupted run (an offset from its first
    appearance) or, for a share of the training kinds, "after a checkpoint", and its recovery."""
    kinds = [kind for kind in victim_kinds for _ in range(2)][:count]
    kinds += [rng.choice(victim_kinds) for _ in range(count - len(kinds))]
    rng.shuffle(kinds)
    trials = []
    for index, kind in enumerate(kinds):
        first, last = lives[kind]
        delay = rng.uniform(0.0, 0.9 * (last - first))  # not the last moments: a faster run ends them
        recovery = "retry" if kind != "flow" and rng.random() < retry_share else "re-run"
        after_checkpoint = kind in TRAINING_KINDS and rng.random() < after_checkpoint_share
        checkpointed = rng.choice(TRAINING_STAGES) if after_checkpoint else None
        trials.append(Trial(index, kind, delay, recovery, checkpointed))
    return trials


def row(trial: Trial) -> str:
    diff = "-" if trial.max_abs_diff is None else f"{trial.max_abs_diff:.3g}"
    killed = "-" if trial.killed_at is None else f"{trial.killed_at:.0f}s"
    if trial.checkpointed:
        killed += f" ({trial.checkpointed} checkpointed)"
    redone = ",".join(trial.redone) or "-"
    resumed = ",".join(trial.resumed) or "-"
    result = "ok" if trial.ok else "FAIL: " + "; ".join(trial.problems)
    return (f"{trial.index:>5}  {trial.kind:<10} {killed:>28}  {trial.victim:<14} {trial.interrupted_rc!s:>4}  "
            f"{trial.recovery:<7} {trial.recovered_rc!s:>4}  {redone:<40} {resumed:<26} {diff:>9}  {trial.seconds:>5.0f}s  {result}")


HEADER = (f"{'trial':>5}  {'kind':<10} {'killed':>28}  {'victim':<14} {'rc':>4}  {'recover':<7} {'rc2':>4}  "
          f"{'stages the recovery ran':<40} {'resumed from a checkpoint':<26} {'max|diff|':>9}  {'time':>6}  result")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--steps", type=int, default=2,
                        help="optimizer steps per training stage (2: a checkpoint after step 1 to resume from)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill schedule")
    parser.add_argument("--jobs", type=int, default=1, help="trials run at the same time")
    parser.add_argument("--retry-share", type=float, default=0.3,
                        help="share of trials (flow kills excepted) recovered with `prefect flow-run retry`")
    parser.add_argument("--after-checkpoint-share", type=float, default=0.5,
                        help="share of the training kills (supervisor, launcher, rank) made once a training "
                        "stage has saved a checkpoint, to a process of that stage")
    parser.add_argument("--kinds", default=",".join(VICTIM_KINDS),
                        help=f"kinds of process to draw victims from (default: all, {','.join(VICTIM_KINDS)})")
    parser.add_argument("--evaluate", action="store_true", help="run the demo itself, evaluate stage included")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bunny-fault-trials"))
    parser.add_argument("--only", type=int, nargs=2, metavar=("FIRST", "END"),
                        help="run trials FIRST..END-1 of the schedule (several calls share one schedule)")
    parser.add_argument("--reuse-baseline", action="store_true",
                        help="take the uninterrupted run from an earlier call with the same --workdir")
    parser.add_argument("--run-pipeline", type=Path, help=argparse.SUPPRESS)  # a trial's flow process
    parser.add_argument("--retry", nargs=2, metavar=("WORKDIR", "RUN"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_pipeline:
        return run_pipeline(args.run_pipeline.absolute(), args.steps)
    if args.retry:
        return retry_flow_run(Path(args.retry[0]), args.retry[1])
    base = args.workdir.absolute()
    base.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)

    baseline = base / "baseline"
    recorded = baseline / "lives.json"
    if args.reuse_baseline and recorded.is_file():
        lives, baseline_seconds = json.loads(recorded.read_text()).values()
    else:
        shutil.rmtree(baseline, ignore_errors=True)
        baseline.mkdir()
        lives = {}
        started = time.monotonic()
        rc = watch(start(pipeline_command(baseline, args.steps, args.evaluate), baseline, "run.log"), set(), lives,
                   started)
        baseline_seconds = time.monotonic() - started
        if rc != 0:
            print(f"the uninterrupted run failed (status {rc}); see {baseline}/run.log", file=sys.stderr)
            return 1
        recorded.write_text(json.dumps({"lives": lives, "seconds": baseline_seconds}))
    missing = [kind for kind in VICTIM_KINDS if kind not in lives]
    if missing:
        print(f"the uninterrupted run showed no process of kind {missing}", file=sys.stderr)
        return 1
    reference = averaged_tensors(baseline / "pipeline")
    print(f"uninterrupted run: {baseline_seconds:.0f} s, {len(reference)} averaged tensors; load average "
          f"{os.getloadavg()[0]:.1f}; lives (s): "
          + ", ".join(f"{kind} {a:.0f}-{b:.0f}" for kind, (a, b) in lives.items()), flush=True)
    print(HEADER, flush=True)

    victim_kinds = tuple(args.kinds.split(","))
    unknown = sorted(set(victim_kinds) - set(VICTIM_KINDS))
    if unknown:
        parser.error(f"--kinds: unknown {unknown}; choose from {','.join(VICTIM_KINDS)}")
    trials = schedule(args.trials, lives, rng, args.retry_share, args.after_checkpoint_share, victim_kinds)
    rngs = [random.Random(rng.random()) for _ in trials]  # each trial's victim draw, whatever the order
    if args.only:
        trials = trials[args.only[0]:args.only[1]]
    print_lock = threading.Lock()
    loads: list[float] = []

    def one(trial: Trial) -> Trial:
        run_trial(trial, base, baseline / "assets", args.steps, args.evaluate, reference, rngs[trial.index])
        with print_lock:
            loads.append(os.getloadavg()[1])
            print(row(trial), flush=True)
        return trial

    trials_started = time.monotonic()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        trials = list(pool.map(one, trials))
    elapsed = time.monotonic() - trials_started

    passed = sum(trial.ok for trial in trials)
    killed = {kind: sum(t.victim == kind for t in trials) for kind in VICTIM_KINDS}
    recoveries = {way: sum(t.recovery == way for t in trials) for way in ("re-run", "retry")}
    identical = sum(t.max_abs_diff == 0.0 for t in trials)
    resumed = sum(bool(t.resumed) for t in trials)
    print(f"\nsummary: {passed}/{len(trials)} trials passed; killed per kind: "
          + ", ".join(f"{k} x{v}" for k, v in killed.items())
          + f" ({sum(killed.values())} kills); recoveries: re-run x{recoveries['re-run']}, "
          f"retry x{recoveries['retry']}; resumed from a checkpoint: {resumed}/{len(trials)}; "
          f"bit-identical averages: {identical}/{len(trials)}; "
          f"{elapsed / 60:.0f} min for the trials at --jobs {args.jobs}, 5-min load average "
          f"{min(loads, default=0):.1f}-{max(loads, default=0):.1f}")
    print(json.dumps({"trials": len(trials), "passed": passed, "killed": killed, "recoveries": recoveries,
                      "identical": identical, "resumed": resumed, "steps": args.steps, "jobs": args.jobs,
                      "baseline_seconds": round(baseline_seconds, 1), "trials_seconds": round(elapsed, 1)}))
    return 0 if passed == len(trials) else 1


if __name__ == "__main__":
    sys.exit(main())
