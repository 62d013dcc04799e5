"""Does the tiny pipeline learn? Held-out answer loss and accuracy of every model it makes.

    python benchmarks/learning_check.py [--workdir DIR] [--steps N]

Runs the demo pipeline from scratch (`python -m flows.demo --fresh`) with N optimizer steps
per training stage (default 3x the demo's), assembles the pretrain-only model (base LLM +
tower + the pretrained projector, no LoRA), then scores it, both merged recipes and the
0.3 / 0.7 average (and the searched average, when the pipeline made one) with the project's
evaluation, `python -m bunny.evaluate`, on the tiny held-out split (fresh images, unseen text
questions). Prints the evaluation's table and the accuracy a uniform guess gets on the
held-out questions, per kind; the target is the average at >= 3x chance on the colour and
shape questions. About 10-15 min on 2 cores.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bunny.tiny import make_tiny_assets  # noqa: E402
from bunny.tiny.data import COLORS, SHAPES, SIZE_FRACTIONS  # noqa: E402
from flows.config import DEMO_PRETRAIN_STEPS, DEMO_RECIPE_STEPS  # noqa: E402

# question -> how many answers a guesser chooses from (the tiny data's question kinds)
QUESTION_KINDS: tuple[tuple[str, str, int], ...] = (
    ("shape", r"^(What shape|Name the shape)", len(SHAPES)),
    ("colour", r"^What color is the (shape|circle|square|triangle)\?$", len(COLORS)),
    ("background", r"background", len(COLORS) - 1),
    ("size", r"small or large|large or small", len(SIZE_FRACTIONS)),
    ("presence", r"^Is there a", 2),
)


def question_kind(question: str) -> tuple[str, int] | None:
    """The kind of an image question and its number of possible answers (None: open-ended)."""
    question = question.replace("<image>", "").strip()
    for kind, pattern, choices in QUESTION_KINDS:
        if re.search(pattern, question):
            return kind, choices
    return None


def chance_table(heldout: Path) -> dict[str, tuple[int, float]]:
    """Per question kind over the held-out image questions: (count, a uniform guess's accuracy)."""
    counts: dict[str, list[int]] = {}
    for record in json.loads(heldout.read_text(encoding="utf-8")):
        if "image" not in record:
            continue
        for turn in record["conversations"][::2]:
            found = question_kind(turn["value"])
            if found:
                counts.setdefault(found[0], [0, found[1]])[0] += 1
    table = {kind: (n, 1 / choices) for kind, (n, choices) in counts.items()}
    colour_shape = [table[k] for k in ("colour", "shape") if k in table]
    n = sum(count for count, _ in colour_shape)
    table["colour+shape"] = (n, sum(count * p for count, p in colour_shape) / max(n, 1))
    return table


def pretrain_only_model(assets, projector: Path, folder: Path) -> Path:
    """A full model folder: the base LLM, the tower and the pretrain stage's projector."""
    from transformers import AutoImageProcessor, AutoTokenizer

    from bunny.model.builder import build_bunny_model

    model = build_bunny_model(assets.llm, "phi-3", assets.vision_tower, "mlp2x_gelu",
                              pretrain_mm_mlp_adapter=projector)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(assets.llm).save_pretrained(folder)
    AutoImageProcessor.from_pretrained(assets.vision_tower).save_pretrained(folder)
    return folder


def run_pipeline(workdir: Path, steps: int | None) -> float:
    started = time.perf_counter()
    command = [sys.executable, "-m", "flows.demo", "--workdir", str(workdir), "--fresh"]
    if steps is not None:
        command += ["--steps", str(steps)]
    with open(workdir / "demo.log", "w") as log:
        done = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"the pipeline failed; see {workdir / 'demo.log'}")
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="default: a temporary folder")
    parser.add_argument("--steps", type=int, default=3 * DEMO_RECIPE_STEPS,
                        help=f"optimizer steps per training stage (the demo: {DEMO_PRETRAIN_STEPS} "
                             f"pretrain, {DEMO_RECIPE_STEPS} per recipe)")
    args = parser.parse_args()
    if importlib.util.find_spec("bunny.evaluate") is None:
        raise SystemExit("bunny.evaluate is not in this checkout yet (issue 9, section 2); nothing to score with")
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="bunny-learning-"))).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    assets = make_tiny_assets(workdir / "assets")
    seconds = run_pipeline(workdir, args.steps)
    root = workdir / "pipeline"
    models = {
        "pretrain-only": pretrain_only_model(assets, root / "pretrain/output/mm_projector.bin",
                                             workdir / "pretrain-only"),
        "recipe-1": root / "merge-recipe-1/output",
        "recipe-2": root / "merge-recipe-2/output",
        "average 0.3/0.7": root / "average/output",
    }
    searched = sorted(root.glob("average*/search*/output")) + sorted(root.glob("search*/output"))
    if searched:
        models["searched average"] = searched[0]

    print(f"pipeline ({args.steps} steps per training stage, {os.cpu_count()} cores): {seconds:.0f} s")
    for name, path in models.items():
        print(f"  {name:16s} {path}")
    evaluated = subprocess.run(
        [sys.executable, "-m", "bunny.evaluate", *map(str, models.values()),
         "--data", str(assets.heldout_data), "--image_folder", str(assets.finetune_images)],
        cwd=REPO, text=True,
    )
    print("\nchance (a uniform guess) on the held-out image questions:")
    for kind, (count, accuracy) in chance_table(assets.heldout_data).items():
        print(f"  {kind:13s} {count:4d} questions  {accuracy:.3f}  (3x chance: {min(1.0, 3 * accuracy):.3f})")
    return evaluated.returncode


if __name__ == "__main__":
    sys.exit(main())
