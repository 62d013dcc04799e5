"""``bunny-evaluate`` / ``python -m bunny.evaluate``: score models on a held-out Bunny-format file.

    python -m bunny.evaluate recipe-1/merged recipe-2/merged average/output \\
        --data heldout.json --image_folder images --output eval/
"""

from __future__ import annotations

import argparse
import gc
from collections.abc import Sequence
from pathlib import Path

from bunny.cli import UserError, add_debug_flag, run_model_command
from bunny.evaluate.settings import DEFAULT_MAX_NEW_TOKENS, EvalSettings
from bunny.generate.cli import add_model_arguments

PROG = "bunny-evaluate"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Answer loss (teacher forced, training's masking) and greedy answer accuracy of one or more "
        "models on a held-out Bunny-format file; per-record JSONL and a summary table.",
    )
    parser.add_argument("models", nargs="+", type=Path, help="model folders (as bunny-generate takes them)")
    parser.add_argument("--data", required=True, type=Path, help="held-out Bunny-format JSON")
    parser.add_argument("--image_folder", type=Path, help="folder the records' 'image' paths are relative to")
    parser.add_argument("--output", type=Path, help="results folder (per-model records.jsonl, summary.json, summary.md)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, help="greedy answer length limit")
    parser.add_argument("--loss_only", action="store_true", help="skip generation: answer loss only")
    add_model_arguments(parser)
    add_debug_flag(parser)
    return parser


def _main(args: argparse.Namespace) -> int:
    # Imported after parsing: torch and transformers take seconds, --help should not wait.
    import torch

    from bunny.evaluate.evaluator import EvalResult, evaluate_model, load_eval_data
    from bunny.evaluate.results import model_labels, summary_table, write_model_results, write_summary
    from bunny.generate.loading import ModelLoadError, load_model

    missing = [str(path) for path in args.models if not path.is_dir()]
    if missing:
        raise ModelLoadError(f"model folder{'s' if len(missing) > 1 else ''} not found: {', '.join(missing)}")
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise UserError("--batch_size and --max_new_tokens must be positive")
    data = load_eval_data(args.data, args.image_folder, args.template)
    settings = EvalSettings(args.batch_size, args.max_new_tokens, accuracy=not args.loss_only, progress=True)
    labels = model_labels(args.models)
    results: list[EvalResult] = []
    for path, label in zip(args.models, labels):
        loaded = load_model(path, model_base=args.model_base, template=args.template, device=args.device, dtype=args.dtype)
        results.append(evaluate_model(loaded, data, settings, name=label))
        if args.output is not None:  # each model's results as soon as they exist
            write_model_results(results[-1], args.output / label)
        del loaded
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(summary_table([result.summary for result in results]), end="")
    if args.output is not None:
        write_summary(results, args.output)
        print(f"wrote per-record results and the summary to {args.output}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_model_command(PROG, build_parser(), _main, argv)
