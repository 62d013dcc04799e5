"""Trainer callbacks: live progress files for the orchestrator, opt-in step timing for the
throughput benchmark, and a test-only fault hook."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import TrainerCallback

PROGRESS_FILE = "progress.json"
METRICS_FILE = "metrics.jsonl"
STEP_TIMING_FILE = "step_timing.json"


class ProgressFileCallback(TrainerCallback):
    """``progress.json`` (replaced atomically at every log) and ``metrics.jsonl`` (one JSON
    line per log) in the output folder: what the flow shows as live progress and loss curve,
    without parsing the console."""

    def __init__(self, output_dir: str | Path):
        self.output_dir = Path(output_dir)

    def on_train_begin(self, args, state, control, **kwargs):
        """A resumed run restarts at its checkpoint's step: drop the lines logged after it (the
        steps a crash undid, about to be trained again), so each step appears once."""
        path = self.output_dir / METRICS_FILE
        if not state.is_world_process_zero or not path.is_file():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= state.global_step:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by the crash
        tmp = self.output_dir / f".{METRICS_FILE}.tmp"
        tmp.write_text("".join(kept))
        os.replace(tmp, path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        record = {"step": state.global_step, "max_steps": state.max_steps, "epoch": state.epoch, "time": time.time(), **logs}
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with open(self.output_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
        tmp = self.output_dir / f".{PROGRESS_FILE}.tmp"
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.output_dir / PROGRESS_FILE)


class StepTimingCallback(TrainerCallback):
    """Per optimizer step: wall time, time spent fetching its batches, peak accelerator memory.

    Opt-in with ``BUNNY_STEP_TIMING=1`` (``from_env`` returns None otherwise, and nothing is
    timed). The accelerator is synchronised at each step end so a step's wall time is its own;
    a step's interval runs from the previous step's end to its end, so it holds the logging,
    data fetching, forward, backward and optimizer step. ``BunnyTrainer`` wraps its batch
    fetching in :meth:`waiting_for_data`. The rank-0 process writes ``step_timing.json`` in the
    output folder when training ends (``bunny.bench.throughput`` reads it).
    """

    ENV = "BUNNY_STEP_TIMING"

    def __init__(self, output_dir: str | Path):
        self.output_dir = Path(output_dir)
        self.steps: list[dict] = []
        self._data_wait = 0.0
        self._last_end = 0.0

    @classmethod
    def from_env(cls, output_dir: str | Path) -> "StepTimingCallback | None":
        return cls(output_dir) if os.environ.get(cls.ENV) == "1" else None

    @contextlib.contextmanager
    def waiting_for_data(self) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self._data_wait += time.perf_counter() - started

    @staticmethod
    def _cuda() -> bool:
        return torch.cuda.is_available() and torch.cuda.is_initialized()

    def _mark(self) -> float:
        if self._cuda():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        if self._cuda():
            torch.cuda.reset_peak_memory_stats()
        self._data_wait = 0.0
        self._last_end = self._mark()

    def on_step_end(self, args, state, control, **kwargs):
        now = self._mark()
        peak = None
        if self._cuda():
            peak = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        self.steps.append(
            {"step": state.global_step, "wall_s": now - self._last_end, "data_wait_s": self._data_wait, "peak_bytes": peak}
        )
        self._data_wait = 0.0
        self._last_end = now

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        record = {
            "device": torch.cuda.get_device_name() if self._cuda() else "cpu",
            "world_size": args.world_size,
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "gradient_checkpointing": args.gradient_checkpointing,
            "steps": self.steps,
        }
        self.output_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.output_dir / f".{STEP_TIMING_FILE}.tmp"
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, self.output_dir / STEP_TIMING_FILE)


class FaultInjectionCallback(TrainerCallback):
    """Test hook for the orchestrator's retry path. With ``BUNNY_FAULT_AT_STEP=N`` and
    ``BUNNY_FAULT_ONCE_FILE=path`` set, the process exits with code 3 right after the first
    checkpoint at or after step N is saved, once (the file records that it happened). With
    ``BUNNY_FAULT_ON=log`` it exits instead right after step N is logged, wherever the last
    checkpoint is (a crash between checkpoints)."""

    EXIT_CODE = 3

    def __init__(self, at_step: int, once_file: Path, on: str = "save"):
        if on not in ("save", "log"):
            raise ValueError(f"BUNNY_FAULT_ON={on!r}: use save or log")
        self.at_step = at_step
        self.once_file = once_file
        self.on = on

    @classmethod
    def from_env(cls) -> "FaultInjectionCallback | None":
        step, once = os.environ.get("BUNNY_FAULT_AT_STEP"), os.environ.get("BUNNY_FAULT_ONCE_FILE")
        return cls(int(step), Path(once), os.environ.get("BUNNY_FAULT_ON", "save")) if step and once else None

    def _fail(self, state, what: str) -> None:
        if state.global_step >= self.at_step and not self.once_file.exists():
            self.once_file.parent.mkdir(parents=True, exist_ok=True)
            self.once_file.write_text(str(state.global_step))
            print(f"BUNNY_FAULT_AT_STEP: injected failure after {what}-{state.global_step}", flush=True)
            os._exit(self.EXIT_CODE)

    def on_save(self, args, state, control, **kwargs):
        if self.on == "save":
            self._fail(state, "checkpoint")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.on == "log":
            self._fail(state, "step")
