"""``bunny-search-weights`` / ``python -m bunny.evaluate.search_weights``: averaging weights chosen on data.

    python -m bunny.evaluate.search_weights recipe-1/merged recipe-2/merged \\
        --data validation.json --image_folder images --output average --curve curve.json

Two models: the first model's weight on a grid (default 0, 0.1, ..., 1); more: greedy soup.
Prints the curve (weights -> validation answer loss) and the chosen weights; writes the chosen
average to ``--output`` and the whole result as JSON to ``--curve``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path


from bunny.cli import add_debug_flag, run_model_command
from bunny.evaluate.evaluator import load_eval_data
from bunny.evaluate.search import DEFAULT_GRID, answer_loss_scorer, check_grid, search_average_weights
from bunny.fsutil import write_json_atomic
from bunny.generate.loading import DEFAULT_TEMPLATE, DTYPES

PROG = "bunny-search-weights"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0].split(": ", 1)[1])
    parser.add_argument("models", nargs="+", type=Path, help="two or more full model folders (merged recipes)")
    parser.add_argument("--data", required=True, type=Path, help="validation Bunny-format JSON (never the test split)")
    parser.add_argument("--image_folder", type=Path)
    parser.add_argument("--output", type=Path, help="write the chosen average here")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    parser.add_argument("--curve", type=Path, help="write the result (curve, chosen weights) as JSON here")
    parser.add_argument("--grid", type=float, nargs="+", default=list(DEFAULT_GRID),
                        help="weights of the first of two models to try (default 0 0.1 ... 1)")
    parser.add_argument("--inherit-from", type=int, default=-1,
                        help="index of the model whose config/tokenizer the averages get (default -1: the last)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--version", dest="template", default=DEFAULT_TEMPLATE, help="conversation template")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES])
    add_debug_flag(parser)
    return parser


def _main(args: argparse.Namespace) -> int:
    check_grid(args.grid)  # cheap checks before the data's images are opened
    data = load_eval_data(args.data, args.image_folder, args.template)
    score = answer_loss_scorer(data, batch_size=args.batch_size, device=args.device, dtype=args.dtype)
    result = search_average_weights(args.models, score, grid=args.grid, inherit_from=args.inherit_from,
                                    output_dir=args.output, overwrite=args.overwrite)
    print("| weights | validation answer loss |\n| --- | ---: |")
    for candidate in result.curve:
        print(f"| {' / '.join(f'{w:.3g}' for w in candidate.weights)} | {candidate.loss:.4f} |")
    print(f"chosen ({result.method}): {' / '.join(f'{w:.3g}' for w in result.weights)}, loss {result.loss:.4f}"
          + (f", written to {result.output_dir}" if result.output_dir is not None else ""))
    if args.curve is not None:
        write_json_atomic(args.curve, result.to_json())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_model_command(PROG, build_parser(), _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
