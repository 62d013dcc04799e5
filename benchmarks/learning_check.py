"""Does the tiny pipeline learn? Held-out answer loss and accuracy of every model it makes.

    python benchmarks/learning_check.py [--workdir DIR] [--steps N] [--skip-pipeline]

Runs the demo pipeline from scratch (`python -m flows.demo --fresh`) with N optimizer steps
per training stage (default 3x the demo's recipe steps), splits the tiny held-out file
(fresh images, unseen text questions) into a validation third and a test rest, chooses
averaging weights for the two merged recipes on the validation third
(`bunny.evaluate.search`), and scores on the test rest, with the project's evaluation
(`bunny.evaluate`): the pretrain-only model (base LLM + tower + the pretrained projector,
no LoRA), both merged recipes, the 0.3 / 0.7 average and the searched average. Prints the
evaluation's table, then accuracy per question kind next to a uniform guess's (chance);
the target is the 0.3 / 0.7 average at >= 3x chance on the colour and shape questions.
About 10-15 min on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bunny.tiny import make_tiny_assets  # noqa: E402
from bunny.tiny.scoring import POOLED, accuracy_by_kind, chance_by_kind, kind_table  # noqa: E402
from flows.config import DEMO_PRETRAIN_STEPS, DEMO_PRETRAINED_ASSETS, DEMO_RECIPE_STEPS  # noqa: E402

VALIDATION_SHARE = 1 / 3


def split_heldout(heldout: Path, folder: Path) -> tuple[Path, Path]:
    """The held-out file's first third as validation (weight search), the rest as test."""
    records = json.loads(heldout.read_text(encoding="utf-8"))
    cut = round(len(records) * VALIDATION_SHARE)
    folder.mkdir(parents=True, exist_ok=True)
    validation, test = folder / "validation.json", folder / "test.json"
    validation.write_text(json.dumps(records[:cut], indent=1), encoding="utf-8")
    test.write_text(json.dumps(records[cut:], indent=1), encoding="utf-8")
    return validation, test


def run_pipeline(workdir: Path, steps: int) -> float:
    started = time.perf_counter()
    command = [sys.executable, "-m", "flows.demo", "--workdir", str(workdir), "--fresh", "--steps", str(steps)]
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
    parser.add_argument("--skip-pipeline", action="store_true", help="score the pipeline already in --workdir")
    args = parser.parse_args()
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="bunny-learning-"))).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from bunny.evaluate.evaluator import EvalSettings, evaluate_model, load_eval_data
    from bunny.evaluate.results import summary_table
    from bunny.evaluate.search import answer_loss_scorer, search_average_weights
    from bunny.generate.loading import load_model

    assets = make_tiny_assets(workdir / "assets", pretrained=DEMO_PRETRAINED_ASSETS)  # the demo's assets
    if not args.skip_pipeline:
        seconds = run_pipeline(workdir, args.steps)
        print(f"pipeline ({args.steps} steps per training stage, {os.cpu_count()} cores): {seconds:.0f} s")
    root = workdir / "pipeline"
    validation, test = split_heldout(assets.heldout_data, workdir / "heldout")
    recipes = [root / "merge-recipe-1/output", root / "merge-recipe-2/output"]

    started = time.perf_counter()
    search = search_average_weights(recipes, answer_loss_scorer(load_eval_data(validation, assets.finetune_images)),
                                    output_dir=workdir / "searched-average", overwrite=True)
    print(f"weight search on {validation.name} ({time.perf_counter() - started:.0f} s): recipe-1 weight "
          + ", ".join(f"{c.weights[0]:.1f} -> {c.loss:.3f}" for c in search.curve)
          + f"; chosen {search.weights[0]:.1f}")

    models = {
        "pretrain-only": (root / "pretrain/output", assets.llm),
        "recipe-1": (recipes[0], None),
        "recipe-2": (recipes[1], None),
        "average 0.3/0.7": (root / "average/output", None),
        f"searched {search.weights[0]:.1f}/{search.weights[1]:.1f}": (workdir / "searched-average", None),
    }
    data = load_eval_data(test, assets.finetune_images)
    results = []
    for name, (path, base) in models.items():
        results.append(evaluate_model(load_model(path, model_base=base), data, EvalSettings(), name=name))
    print(f"\nheld-out test split ({test}):")
    print(summary_table([r.summary for r in results]), end="")

    records = {r.summary.model: [asdict(record) for record in r.records] for r in results}
    print("\naccuracy per question kind (first turns), chance = a uniform guess:")
    print(kind_table(records), end="")
    average = accuracy_by_kind(records["average 0.3/0.7"]).get(POOLED, [])
    odds = chance_by_kind(records["average 0.3/0.7"])
    ratio = (sum(average) / len(average)) / odds[POOLED] if average else 0.0
    print(f"\naverage 0.3/0.7 on colour+shape: {ratio:.2f}x chance (target >= 3x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
