"""Trainer callbacks: live progress files for the orchestrator, and a test-only fault hook."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from transformers import TrainerCallback

PROGRESS_FILE = "progress.json"
METRICS_FILE = "metrics.jsonl"


class ProgressFileCallback(TrainerCallback):
    """``progress.json`` (replaced atomically at every log) and ``metrics.jsonl`` (one JSON
    line per log) in the output folder: what the flow shows as live progress and loss curve,
    without parsing the console."""

    def __init__(self, output_dir: str | Path):
        self.output_dir = Path(output_dir)

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


class FaultInjectionCallback(TrainerCallback):
    """Test hook for the orchestrator's retry path. With ``BUNNY_FAULT_AT_STEP=N`` and
    ``BUNNY_FAULT_ONCE_FILE=path`` set, the process exits with code 3 right after the first
    checkpoint at or after step N is saved, once (the file records that it happened)."""

    EXIT_CODE = 3

    def __init__(self, at_step: int, once_file: Path):
        self.at_step = at_step
        self.once_file = once_file

    @classmethod
    def from_env(cls) -> "FaultInjectionCallback | None":
        step, once = os.environ.get("BUNNY_FAULT_AT_STEP"), os.environ.get("BUNNY_FAULT_ONCE_FILE")
        return cls(int(step), Path(once)) if step and once else None

    def on_save(self, args, state, control, **kwargs):
        if state.global_step >= self.at_step and not self.once_file.exists():
            self.once_file.parent.mkdir(parents=True, exist_ok=True)
            self.once_file.write_text(str(state.global_step))
            print(f"BUNNY_FAULT_AT_STEP: injected failure after checkpoint-{state.global_step}", flush=True)
            os._exit(self.EXIT_CODE)
