"""Bytes and time of one pretrain checkpoint at Bunny-4B's shapes: the full checkpoint HF
Trainer writes for a non-PEFT model ("before") against the trainables-only one BunnyTrainer
writes ("after"), in one run.

The model is Bunny-v1.0-4B's (Phi-3-mini + SigLIP so400m + the mlp2x_gelu projector, shapes
from ``bunny.bench.shapes.REFERENCE``) with random bf16 weights, in a DeepSpeed ZeRO-2 engine
on the CPU (one process, gloo), trained as the pretrain stage trains it: everything frozen but
the projector. One optimizer step on a projector-only loss gives the AdamW moments, then the
engine saves once per variant through ``save_checkpoint(exclude_frozen_parameters=...)``, the
call ``BunnyTrainer`` makes. Save time includes an fsync of every file written (the page cache
would otherwise hide most of a multi-GB write). Needs about 9 GB of memory and 2x the frozen
size of free disk at the full depth; ``--layers`` shrinks the LLM for a quick look.

    python benchmarks/checkpoint_bench.py [--layers 32] [--tower-layers 27] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bunny.bench.shapes import REFERENCE  # noqa: E402
from bunny.model.families import BunnyPhi3Config, BunnyPhi3ForCausalLM  # noqa: E402

GIB = 2**30


def bunny_4b(layers: int, tower_layers: int) -> BunnyPhi3ForCausalLM:
    """Bunny-4B with random bf16 weights (uniform: several times faster to draw than normal)."""
    llm = REFERENCE.llm_config(num_hidden_layers=layers)
    tower = REFERENCE.vision_config()
    tower.num_hidden_layers = tower_layers
    fields = {k: v for k, v in llm.to_dict().items() if k not in ("model_type", "architectures", "transformers_version", "use_cache")}
    config = BunnyPhi3Config(
        **fields, mm_vision_tower="siglip-so400m-patch14-384", vision_tower_config=tower.to_dict(),
        mm_vision_select_layer=-2, mm_hidden_size=tower.hidden_size, mm_projector_type="mlp2x_gelu", use_cache=False,
    )
    with torch.device("meta"):
        model = BunnyPhi3ForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.uniform_(-0.02, 0.02, generator=generator)
    model.requires_grad_(False)
    model.get_model().mm_projector.requires_grad_(True)  # the pretrain stage's trainables
    return model


def engine_after_one_step(model: BunnyPhi3ForCausalLM):
    import deepspeed

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        os.environ.setdefault("MASTER_PORT", str(sock.getsockname()[1]))
    deepspeed.init_distributed(dist_backend="gloo")
    config = {  # bunny/train/ds_configs/zero2.json with the "auto" fields filled as HF fills them
        "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
        "bf16": {"enabled": True}, "zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True},
    }
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    projector = model.get_model().mm_projector
    features = torch.randn(1, 8, model.config.mm_hidden_size, dtype=torch.bfloat16)  # the moments exist after any step
    loss = projector(features).float().pow(2).mean()
    engine.backward(loss)
    engine.step()
    return engine


def fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def timed_save(engine, folder: Path, exclude_frozen: bool) -> tuple[float, int, dict[str, int]]:
    started = time.perf_counter()
    engine.save_checkpoint(str(folder), tag="global_step1", exclude_frozen_parameters=exclude_frozen)
    fsync_tree(folder)
    seconds = time.perf_counter() - started
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    return seconds, sum(files.values()), files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=REFERENCE.llm["num_hidden_layers"], help="LLM depth (32: Phi-3-mini)")
    parser.add_argument("--tower-layers", type=int, default=REFERENCE.vision["num_hidden_layers"])
    parser.add_argument("--dir", type=Path, default=None, help="where the checkpoints are written (default: a temp folder)")
    args = parser.parse_args()

    started = time.perf_counter()
    model = bunny_4b(args.layers, args.tower_layers)
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"model: LLM {args.layers} layers, tower {args.tower_layers} layers; frozen {frozen / GIB:.2f} GiB bf16, "
          f"trainable {trainable / 1e6:.1f} M parameters (built in {time.perf_counter() - started:.0f} s)")
    engine = engine_after_one_step(model)

    root = Path(tempfile.mkdtemp(prefix="checkpoint-bench-", dir=args.dir))
    try:
        results = {}
        # "after" first, so "before" cannot gain from a page cache warmed by a larger write
        for label, exclude in (("after (trainables only)", True), ("before (HF's full checkpoint)", False)):
            folder = root / label.split()[0]
            results[label] = timed_save(engine, folder, exclude)
            seconds, size, files = results[label]
            print(f"{label:30s} {size / 2**20:10.1f} MiB {seconds:8.2f} s   " + ", ".join(f"{k}: {v / 2**20:.1f} MiB" for k, v in files.items()))
            shutil.rmtree(folder)
        (after_s, after_b, _), (before_s, before_b, _) = results.values()
        print(f"after / before: bytes {after_b / before_b:.5f} ({before_b / after_b:.0f}x smaller), "
              f"save time {after_s / before_s:.4f} ({before_s / after_s:.0f}x faster)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
