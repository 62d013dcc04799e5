"""``bunny-merge`` / ``python -m bunny.merge``: the tutorial's merge command.

    python -m bunny.merge --model-path ./checkpoints-phi-3/bunny-lora-phi-3-recipe-1 \\
        --model-base /path/to/microsoft/Phi-3-mini-4k-instruct --model-type phi-3 \\
        --save-model-path ./checkpoints-phi-3/bunny-phi-3-recipe-1
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence

from bunny.average import DEFAULT_MAX_SHARD_SIZE
from bunny.cli import add_debug_flag, run_cli
from bunny.merge.options import DTYPE_ALIASES, MERGE_METHODS
from bunny.model.registry import FAMILY_NAMES
from bunny.fsutil import format_bytes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bunny-merge",
        description="Merge a Bunny LoRA run (its output folder or a checkpoint-* in it) into its base LLM "
        "and save a complete, self-contained model folder.",
    )
    parser.add_argument("--model-path", required=True, help="LoRA output folder or one of its checkpoint-* folders")
    parser.add_argument("--model-base", required=True, help="the base LLM's folder (as --model_name_or_path in training)")
    parser.add_argument("--save-model-path", required=True, help="output folder (must not exist unless --overwrite)")
    parser.add_argument("--model-type", choices=sorted(FAMILY_NAMES), help="LLM family (default: the run's own)")
    parser.add_argument("--dtype", choices=sorted(DTYPE_ALIASES), help="output precision (default: the run's training dtype)")
    parser.add_argument(
        "--vision-tower",
        help="folder of the vision tower, when it is not where the run recorded it (mm_vision_tower): "
        "a frozen tower's weights come from there; the original Bunny's runs also take the tower's "
        "config from there (an unfrozen tower's weights come from the run itself)",
    )
    parser.add_argument(
        "--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
        help=f"largest weight shard, e.g. 5GB, 2GiB, 500MB (default {DEFAULT_MAX_SHARD_SIZE})",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    # PEFT's own merge, for benchmarks/merge_bench.py's comparison; not for everyday use.
    parser.add_argument("--merge-method", choices=MERGE_METHODS, default=MERGE_METHODS[0], help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    return run_cli("bunny-merge", lambda: _merge(args), debug=args.debug)


def _merge(args: argparse.Namespace) -> int:
    # Imported here, after parsing: torch, transformers and PEFT take seconds to import.
    from bunny.merge.merger import merge_lora

    started = time.perf_counter()
    result = merge_lora(
        args.model_path,
        args.model_base,
        args.save_model_path,
        args.model_type,
        dtype=args.dtype,
        vision_tower=args.vision_tower,
        overwrite=args.overwrite,
        max_shard_size=args.max_shard_size,
        merge_method=args.merge_method,
    )
    tower = "trained, from the run" if result.tower_trained else "frozen, from its original folder"
    print(
        f"wrote {result.output_dir}: {result.num_tensors} tensors, {format_bytes(result.total_size)} "
        f"{str(result.dtype).removeprefix('torch.')} in {len(result.shard_files)} shard(s) (vision tower {tower}), "
        f"{time.perf_counter() - started:.1f} s ({result.method} merge)"
    )
    return 0
