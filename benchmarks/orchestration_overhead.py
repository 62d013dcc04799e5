"""Orchestration overhead: `python -m flows.demo` against the same stages as plain commands.

    python benchmarks/orchestration_overhead.py [--workdir DIR] [--steps N]

Both sides use the same tiny assets (built first, not timed) and run every stage from
scratch with the same command lines (from `flows.stages.pipeline_jobs`). The demo's time is
its whole process: Python start, Prefect's temporary server, preflight, artifacts, the
stages (recipes in parallel) and the summary. The plain side runs the six commands back to
back in one process tree, each training run with every core, nothing else. Prints both wall
times and their ratio (goal: at most 1.05).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bunny.tiny import make_tiny_assets  # noqa: E402
from flows.config import PipelineConfig  # noqa: E402
from flows.gpus import Placement  # noqa: E402
from flows.launcher import child_environment  # noqa: E402
from flows.stages import TrainJob, pipeline_jobs, planned_inputs  # noqa: E402


def run_demo(workdir: Path, steps: int) -> float:
    started = time.perf_counter()
    with open(workdir / "demo.log", "w") as log:
        done = subprocess.run(
            [sys.executable, "-m", "flows.demo", "--workdir", str(workdir), "--steps", str(steps), "--fresh"],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        )
    if done.returncode != 0:
        raise SystemExit(f"the demo failed; see {workdir / 'demo.log'}")
    return time.perf_counter() - started


def run_plain(workdir: Path, steps: int) -> tuple[float, list[tuple[str, float]]]:
    """The demo's stages, one after the other, as bare subprocesses."""
    root = workdir / "plain"
    shutil.rmtree(root, ignore_errors=True)
    config = PipelineConfig.demo(make_tiny_assets(workdir / "assets"), root, steps=steps)
    jobs = pipeline_jobs(config, {name: Placement() for name in ("pretrain", *[r.name for r in config.recipes])})
    env = child_environment()
    timings = []
    started = time.perf_counter()
    for port, (name, job) in enumerate(jobs.items(), start=29600):
        inputs = planned_inputs(job, jobs)
        command = job.command(inputs, port) if isinstance(job, TrainJob) else job.command(inputs)
        job.dir.output.parent.mkdir(parents=True, exist_ok=True)
        stage_started = time.perf_counter()
        with open(job.dir.path / "plain.log", "w") as log:
            subprocess.run(command, cwd=REPO, env=env, check=True, stdout=log, stderr=subprocess.STDOUT)
        timings.append((name, time.perf_counter() - stage_started))
    return time.perf_counter() - started, timings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="default: a temporary folder")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per training stage")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bunny-overhead-"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_HOME", str(workdir / "prefect-home"))  # a fresh clone's first run
    make_tiny_assets(workdir / "assets")  # shared by both sides, not timed

    plain, stages = run_plain(workdir, args.steps)
    demo = run_demo(workdir, args.steps)

    print(f"cores: {os.cpu_count()}, steps per training stage: {args.steps}")
    for name, seconds in stages:
        print(f"  plain {name:<15} {seconds:6.1f} s")
    print(f"plain commands back to back: {plain:6.1f} s")
    print(f"python -m flows.demo:        {demo:6.1f} s  (Prefect start, preflight, artifacts, parallel recipes)")
    print(f"ratio demo / plain:          {demo / plain:6.3f}  (goal <= 1.05)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
