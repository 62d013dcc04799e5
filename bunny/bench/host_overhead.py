"""Host (Python) time per training step that DeepSpeed's ZeRO stages add, measured on the CPU.

    python -m bunny.bench.host_overhead [--repeats 3]

The model is the Bunny LoRA stage at Bunny-4B's *depths* (32 Phi-3 decoder layers, 27 SigLIP
layers, LoRA on every decoder linear, gradient checkpointing on) with tiny widths and
sequences, so a step's time is almost all framework overhead: the part of a real step the GPU
cannot hide once it exceeds the GPU's own time for the step. Variants: ``torch`` (a plain
loop, the clean loop's way), ``zero2``, ``zero3`` (hooks on every module) and ``zero3_leaf``
(``bunny.train.zero3``: one fetch per transformer layer). Each runs in a fresh process; the
variants are interleaved ``--repeats`` times and the fastest run of each is kept, since the
host may be shared (``cpu_ms``, the process's CPU time per step with one torch thread, is the
steadier figure). One JSON line per variant, and the losses of the first steps (they must
agree: the variants change overhead, not arithmetic).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

VARIANTS = ("torch", "zero2", "zero3", "zero3_leaf")
BATCH, TEXT_TOKENS, IMAGE_SIZE, PATCH = 2, 16, 28, 14  # 4 image tokens


def _step_fn(variant: str, model):
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    if variant == "torch":
        def step(batch):
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.item()

        return step
    import deepspeed

    from bunny.train.zero3 import transformer_layer_classes

    zero = {"stage": 2} if variant == "zero2" else {
        "stage": 3, "stage3_param_persistence_threshold": 640, "stage3_prefetch_bucket_size": 3686,
        "stage3_max_live_parameters": 1e9, "stage3_max_reuse_distance": 1e9,
    }
    if variant == "zero3_leaf":
        deepspeed.utils.set_z3_leaf_modules(model, transformer_layer_classes(model))
    config = {"train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
              "zero_optimization": zero}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, optimizer=optimizer, config=config)

    def step(batch):
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        return loss.item()

    return step


def measure(variant: str, models_dir: Path, steps: int) -> dict:
    """One variant in this process: warm-up steps (their losses), then the mean step time."""
    import torch

    torch.set_num_threads(1)  # one thread: the process's CPU time is then its host work
    from bunny.bench.assets import BenchModels
    from bunny.constants import IMAGE_TOKEN_INDEX
    from bunny.model.builder import build_bunny_model
    from bunny.train.arguments import ModelArguments, TrainingArguments
    from bunny.train.train import set_trainable

    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0"}.items():
        os.environ.setdefault(key, value)
    models = BenchModels(models_dir / "llm", models_dir / "vision_tower")
    torch.manual_seed(0)
    model = build_bunny_model(models.llm, "phi-3", models.vision_tower, "mlp2x_gelu", dtype=torch.float32)
    model_args = ModelArguments(model_name_or_path=str(models.llm), vision_tower=str(models.vision_tower))
    train_args = TrainingArguments(output_dir=tempfile.mkdtemp(), lora_enable=True, lora_r=8, lora_alpha=16,
                                   lora_dropout=0.0, report_to="none")
    model = set_trainable(model, model_args, train_args, "lora")
    for name, param in model.named_parameters():  # LoRA B starts at zero: make the adapters matter
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(3, 500, (BATCH, TEXT_TOKENS), generator=generator)
    input_ids = torch.cat([torch.full((BATCH, 1), IMAGE_TOKEN_INDEX), text], 1)
    labels = torch.cat([torch.full((BATCH, 1), -100), text], 1)
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": torch.ones_like(input_ids),
             "images": torch.randn(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)}
    step = _step_fn(variant, model)
    losses = [round(step(batch), 5) for _ in range(3)]
    started, cpu_started = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step(batch)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return {"variant": variant, "step_ms": round(wall / steps * 1000, 1), "cpu_ms": round(cpu / steps * 1000, 1),
            "losses": losses}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare(cache_dir: Path) -> Path:
    from bunny.bench.assets import prepare_models
    from bunny.bench.shapes import SHAPES

    deep = SHAPES["tiny-deep"]
    probe = replace(deep, name="host-probe", vision={**deep.vision, "image_size": IMAGE_SIZE, "patch_size": PATCH})
    return prepare_models(cache_dir, probe).llm.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bunny.bench.host_overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "bunny-bench-cache")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one variant in this process
    parser.add_argument("--models", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one, args.models, args.steps)), flush=True)
        return 0
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or args.repeats < 1 or args.steps < 1:
        parser.error(f"--variants from {', '.join(VARIANTS)} (unknown: {unknown}); --repeats and --steps positive")
    models_dir = prepare(args.cache_dir)
    best: dict[str, dict] = {}
    for _ in range(args.repeats):
        for variant in variants:
            command = [sys.executable, "-m", "bunny.bench.host_overhead", "--one", variant, "--models", str(models_dir),
                       "--steps", str(args.steps)]
            result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
            if result.returncode != 0 or not lines:
                print(json.dumps({"variant": variant, "error": result.stderr[-2000:]}), flush=True)
                return 1
            row = json.loads(lines[-1])
            if variant not in best or row["cpu_ms"] < best[variant]["cpu_ms"]:
                best[variant] = row
    for variant in variants:
        print(json.dumps({"bench": "host-overhead", **best[variant]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
