"""Training throughput of ``train.py`` at the Bunny-4B shapes, one JSON line per stage.

    python -m bunny.bench.throughput                         # all stages, reference shapes (GPU)
    python -m bunny.bench.throughput --stages pretrain,lora  # a subset
    python -m bunny.bench.throughput --tiny                  # the same logic on the CPU, tiny shapes

Every stage is a real ``deepspeed --num_gpus 1 bunny/train/train.py ...`` run (see
``bunny.bench.stages``) with ``BUNNY_STEP_TIMING=1``, which makes train.py write per-step wall
time, data-wait time and peak GPU memory. The first ``--warmup`` steps are skipped; the rest
give samples/s, tokens/s, model TFLOP/s (counted as the reference clean loop counts them), the
peak memory and the mean time per step spent waiting for batches. Models are built once into
``--cache-dir``; datasets are written into ``--work-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bunny.bench.assets import prepare_models
from bunny.bench.shapes import SHAPES, Shapes
from bunny.bench.stages import STAGES, Stage, scaled, train_argv
from bunny.bench.synthetic import StageData, write_stage_data
from bunny.train.callbacks import STEP_TIMING_FILE, StepTimingCallback

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "train" / "train.py"
DEFAULT_CACHE = Path(os.environ.get("BUNNY_BENCH_CACHE", Path.home() / ".cache" / "bunny-bench"))
LOG_TAIL = 4000


def summarize(stage: Stage, timing: dict, shapes: Shapes, data: StageData, warmup: int) -> dict:
    """The steady-state figures of one stage from its ``step_timing.json``."""
    steps = timing["steps"][warmup:]
    if not steps:
        raise ValueError(f"stage {stage.name}: {len(timing['steps'])} steps timed, none left after {warmup} warm-up steps")
    step_s = sum(step["wall_s"] for step in steps) / len(steps)
    samples = timing["per_device_train_batch_size"] * timing["gradient_accumulation_steps"]
    sequence = shapes.image_tokens + data.text_tokens
    flops = shapes.model_flops_per_sample(sequence, vision_trains=stage.unfreeze_vision_tower) * samples
    peaks = [step["peak_bytes"] for step in steps if step["peak_bytes"] is not None]
    data_wait = sum(step["data_wait_s"] for step in steps) / len(steps)
    return {
        "stage": stage.name,
        "setting": stage.kind,
        "profile": stage.profile,
        "deepspeed": stage.deepspeed,
        "ckpt": stage.gradient_checkpointing,
        "unfreeze_vision_tower": stage.unfreeze_vision_tower,
        "device": timing["device"],
        "shapes": shapes.name,
        "batch": timing["per_device_train_batch_size"],
        "grad_accum": timing["gradient_accumulation_steps"],
        "seq": sequence,
        "text_tokens": data.text_tokens,
        "supervised_tokens": data.supervised_tokens,
        "steps_measured": len(steps),
        "step_s": round(step_s, 4),
        "samples_per_s": round(samples / step_s, 2),
        "tokens_per_s": round(samples * sequence / step_s),
        "model_tflops": round(flops / step_s / 1e12, 1 if timing["device"] != "cpu" else 4),
        "peak_gib": round(max(peaks) / 2**30, 1) if peaks else None,
        "data_wait_s": round(data_wait, 4),
        "data_wait_pct": round(100 * data_wait / step_s, 1),
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(argv: list[str], log_path: Path, timeout: float) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus 1 train.py ARGV``; its output goes to ``log_path``."""
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1",
               "--master_port", str(_free_port()), str(TRAIN_SCRIPT), *argv]
    env = {**os.environ, StepTimingCallback.ENV: "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with open(log_path, "w") as log:
        return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout,
                              cwd=log_path.parent)


class Benchmark:
    """Runs stages one after another within an optional time budget."""

    def __init__(self, shapes: Shapes, cache_dir: Path, work_dir: Path, steps: int, warmup: int, workers: int,
                 time_budget: float | None):
        self.shapes, self.work_dir = shapes, work_dir
        self.steps, self.warmup, self.workers = steps, warmup, workers
        self.started = time.monotonic()
        self.time_budget = time_budget
        self.longest_launch = 0.0
        self.models = prepare_models(cache_dir, shapes)
        self._data: dict[tuple[str, int], StageData] = {}

    def data_for(self, stage: Stage) -> StageData:
        from transformers import AutoTokenizer

        records = (self.steps + self.warmup) * stage.micro_batch
        key = (stage.template, records)
        if key not in self._data:
            tokenizer = AutoTokenizer.from_pretrained(self.models.llm)
            folder = self.work_dir / f"data-{stage.template}-{records}"
            self._data[key] = write_stage_data(folder, stage.template, records, stage.text_tokens, tokenizer,
                                               stage.model_max_length)
        return self._data[key]

    def remaining(self) -> float | None:
        return None if self.time_budget is None else self.time_budget - (time.monotonic() - self.started)

    def run(self, stage: Stage) -> dict:
        remaining = self.remaining()
        if remaining is not None and remaining < max(self.longest_launch, 30.0):
            return {"stage": stage.name, "skipped": f"time budget: {remaining:.0f} s left"}
        data = self.data_for(stage)
        output_dir = self.work_dir / stage.name
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / STEP_TIMING_FILE).unlink(missing_ok=True)
        argv = train_argv(stage, self.models, data, output_dir, self.steps + self.warmup, self.workers)
        log_path = output_dir / "train.log"
        started = time.monotonic()
        try:
            result = launch(argv, log_path, timeout=remaining if remaining is not None else 3600)
            failure = None if result.returncode == 0 else f"train.py exited with {result.returncode}"
        except subprocess.TimeoutExpired:
            failure = "time budget ran out during the run"
        launch_s = time.monotonic() - started
        self.longest_launch = max(self.longest_launch, launch_s)
        timing_file = output_dir / STEP_TIMING_FILE
        if failure or not timing_file.is_file():
            tail = log_path.read_text(errors="replace")[-LOG_TAIL:] if log_path.is_file() else ""
            return {"stage": stage.name, "error": failure or f"no {STEP_TIMING_FILE} written", "log": str(log_path),
                    "log_tail": tail}
        row = summarize(stage, json.loads(timing_file.read_text()), self.shapes, data, self.warmup)
        row["launch_s"] = round(launch_s, 1)
        return row


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bunny.bench.throughput", description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true",
                        help="tiny shapes on the CPU, 2 warm-up + 3 measured steps, 1 dataloader worker")
    parser.add_argument("--shapes", choices=sorted(SHAPES), help="model shapes (default reference; tiny with --tiny)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, from: {', '.join(STAGES)}")
    parser.add_argument("--steps", type=int, help="measured optimizer steps per stage (default 8; 3 with --tiny)")
    parser.add_argument("--warmup", type=int, help="steps run before measuring (default 3; 2 with --tiny)")
    parser.add_argument("--workers", type=int, help="--dataloader_num_workers (default 4 as the tutorial; 1 with --tiny)")
    parser.add_argument("--micro-batch-scale", type=int, default=1,
                        help="multiply the micro-batch of the fast-profile stages by this")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="where the random-weight models are kept")
    parser.add_argument("--work-dir", type=Path, help="datasets and run outputs (default: a new temporary folder)")
    parser.add_argument("--json-out", type=Path, help="also append the JSON lines to this file")
    parser.add_argument("--time-budget", type=float, help="seconds: stop starting stages when the time runs out")
    parser.add_argument("--prepare-only", action="store_true", help="build the cached models, then stop")
    args = parser.parse_args(argv)
    unknown = [name for name in args.stages.split(",") if name not in STAGES]
    if unknown:
        parser.error(f"--stages: unknown {', '.join(unknown)}; known: {', '.join(STAGES)}")
    for flag in ("steps", "warmup", "workers", "micro_batch_scale"):
        value = getattr(args, flag)
        if value is not None and value < (1 if flag in ("steps", "micro_batch_scale") else 0):
            parser.error(f"--{flag.replace('_', '-')} must be {'positive' if flag in ('steps', 'micro_batch_scale') else '>= 0'}")
    args.shapes = args.shapes or ("tiny" if args.tiny else "reference")
    args.steps = args.steps or (3 if args.tiny else 8)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.tiny else 3)
    args.workers = args.workers if args.workers is not None else (1 if args.tiny else 4)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.prepare_only:
        models = prepare_models(args.cache_dir, SHAPES[args.shapes])
        print(json.dumps({"llm": str(models.llm), "vision_tower": str(models.vision_tower)}), flush=True)
        return 0
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="bunny-bench-"))
    work_dir = work_dir.absolute()
    work_dir.mkdir(parents=True, exist_ok=True)
    benchmark = Benchmark(SHAPES[args.shapes], args.cache_dir, work_dir, args.steps, args.warmup, args.workers,
                          args.time_budget)
    print(f"# models in {benchmark.models.llm.parent}, runs in {work_dir}", file=sys.stderr, flush=True)
    failed = False
    for name in args.stages.split(","):
        row = {"bench": "bunny-train", **benchmark.run(scaled(STAGES[name], args.micro_batch_scale))}
        failed |= "error" in row
        line = json.dumps(row)
        print(line, flush=True)
        if args.json_out:
            with open(args.json_out, "a") as out:
                out.write(line + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
