"""``bunny-generate`` / ``python -m bunny.generate``: answers from a model, one question or a file of them.

    python -m bunny.generate MODEL --image photo.png --question "What shape is shown?"
    python -m bunny.generate MODEL --question "How many legs does a cat have?"
    python -m bunny.generate MODEL --questions questions.json --image_folder DIR --answers answers.jsonl
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from bunny.cli import UserError, add_debug_flag, run_model_command
from bunny.fsutil import write_text_atomic
from bunny.generate.settings import DEFAULT_TEMPLATE, DTYPE_NAMES, GenerationSettings

PROG = "bunny-generate"


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared with ``bunny-evaluate``: how to load a model folder."""
    parser.add_argument("--model-base", "--model_base", dest="model_base", type=Path,
                        help="base LLM folder, needed only for a LoRA run (merged on the fly) or a pretrain output")
    parser.add_argument("--version", "--conv-mode", dest="template", default=DEFAULT_TEMPLATE,
                        help=f"conversation template of the prompts (default {DEFAULT_TEMPLATE})")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1... (default: a GPU when there is one)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPE_NAMES],
                        help="weights' precision (default: float32 on the CPU, the saved dtype on a GPU)")


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    """Decoding flags, named as transformers' ``generate`` names them (greedy by default)."""
    defaults = GenerationSettings()
    parser.add_argument("--max_new_tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top_p", type=float)
    parser.add_argument("--top_k", type=int)
    parser.add_argument("--num_beams", type=int, default=defaults.num_beams)
    parser.add_argument("--repetition_penalty", type=float)
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed for sampling")
    parser.add_argument("--batch_size", type=int, default=8, help="questions per generate call")


def settings_from(args: argparse.Namespace) -> GenerationSettings:
    if args.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be positive, got {args.max_new_tokens}")
    return GenerationSettings(
        max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
        top_p=args.top_p, top_k=args.top_k, num_beams=args.num_beams,
        repetition_penalty=args.repetition_penalty, seed=args.seed,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Answer a question (with an image or without) or a Bunny-format JSON file of questions "
        "with a trained Bunny model: merged, averaged, the original Bunny's files, or a LoRA run merged on the fly.",
    )
    parser.add_argument("model", type=Path, help="model folder")
    asked = parser.add_mutually_exclusive_group(required=True)
    asked.add_argument("--question", help="one question; prints the answer")
    asked.add_argument("--questions", type=Path, help="Bunny-format JSON: the first human turn of each record is asked")
    parser.add_argument("--image", type=Path, help="the image --question is about (none: a text-only question)")
    parser.add_argument("--image_folder", type=Path, help="folder the records' 'image' paths are relative to")
    parser.add_argument("--answers", type=Path, help="JSONL output for --questions (default: print to stdout)")
    add_model_arguments(parser)
    add_generation_arguments(parser)
    add_debug_flag(parser)
    return parser


def _main(args: argparse.Namespace) -> int:
    # Imported after parsing: torch and transformers take seconds, --help should not wait.
    from bunny.generate.answers import Question, answer_record, dumps_jsonl, iter_answers, load_questions
    from bunny.generate.loading import load_model

    settings = settings_from(args)
    if args.question is not None:
        if args.image is not None and not args.image.is_file():
            raise UserError(f"--image {args.image}: no such file")
        questions = [Question("question", args.question, args.image)]
    else:
        if args.image is not None:
            raise UserError("--image goes with --question; records of --questions name their own images")
        questions = load_questions(args.questions, args.image_folder)
    loaded = load_model(args.model, model_base=args.model_base, template=args.template, device=args.device, dtype=args.dtype)
    pairs = iter_answers(loaded, questions, settings, args.batch_size, progress=args.questions is not None)
    if args.question is not None:
        print(next(pairs)[1])
        return 0
    rows = [answer_record(question, answer) for question, answer in pairs]
    if args.answers is None:
        print(dumps_jsonl(rows), end="")
    else:
        write_text_atomic(args.answers, dumps_jsonl(rows))
        print(f"wrote {len(rows)} answers to {args.answers}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_model_command(PROG, build_parser(), _main, argv)
