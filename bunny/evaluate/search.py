"""Averaging weights chosen on validation data instead of fixed by hand.

Two models: every weight ``w`` of a grid gives the candidate ``w * first + (1 - w) * second``
(the tutorial's 0.3 / 0.7 is ``w = 0.3``). More than two: greedy soup (Wortsman et al.,
2022, "Model soups"): rank the models by their own validation loss, start from the best, and
add the next one to the uniform average only if the average's loss improves.

Each candidate is streamed by ``bunny.average.average_checkpoints`` into a temporary folder,
scored by its answer loss (``bunny.evaluate``) and deleted, so at most one candidate is on
disk at a time. The lowest loss wins; ties go to the earlier candidate, so the result is
deterministic. The chosen average can be written to an output folder (atomically, by the same
averaging function). Only the validation data given here is looked at: score a test split
separately, with ``evaluate_model``.
"""

from __future__ import annotations

import gc
import math
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from bunny.average import AverageError, average_checkpoints, check_compatible, read_checkpoint
from bunny.cli import UserError
from bunny.evaluate.evaluator import EvalData, answer_loss, answer_losses
from bunny.generate.loading import load_model

DEFAULT_GRID = tuple(round(i / 10, 1) for i in range(11))  # weight of the first model: 0.0, 0.1, ..., 1.0

Score = Callable[[Path], float]  # a model folder -> its validation loss (lower is better)


@dataclass(frozen=True)
class Candidate:
    weights: tuple[float, ...]  # one per input model, in input order
    loss: float


@dataclass(frozen=True)
class WeightSearchResult:
    method: Literal["grid", "greedy_soup"]
    curve: list[Candidate]  # every candidate scored, in the order scored
    weights: tuple[float, ...]  # the chosen weights, one per input model
    loss: float  # the chosen candidate's validation loss
    output_dir: Path | None  # where the chosen average was written, if asked

    def to_json(self) -> dict:
        return {"method": self.method, "weights": list(self.weights), "loss": self.loss,
                "output_dir": str(self.output_dir) if self.output_dir is not None else None,
                "curve": [{"weights": list(c.weights), "loss": c.loss} for c in self.curve]}


def _comparable(loss: float) -> float:
    return math.inf if math.isnan(loss) else loss


def answer_loss_scorer(data: EvalData, *, batch_size: int = 8, device: str | None = None,
                       dtype: str | None = None, progress: bool = False) -> Score:
    """Score a model folder by its answer loss on ``data``."""

    def score(folder: Path) -> float:
        loaded = load_model(folder, template=data.template, device=device, dtype=dtype)
        try:
            return answer_loss(answer_losses(loaded, data, batch_size, progress))
        finally:
            del loaded
            gc.collect()

    return score


class _Candidates:
    """Scores weightings of ``models``: each average is streamed to ``scratch`` and deleted after."""

    def __init__(self, models: Sequence[Path], score: Score, scratch: Path, inherit_from: int):
        self.models, self.score, self.scratch, self.inherit_from = models, score, scratch, inherit_from
        self.curve: list[Candidate] = []

    def __call__(self, weights: Sequence[float]) -> float:
        weights = tuple(float(w) for w in weights)
        # Even a single model (weights 1, 0, ...) goes through the average, so every candidate
        # is scored with the same inherited config and the same dtype round trip.
        folder = self.scratch / f"candidate-{len(self.curve)}"
        average_checkpoints(self.models, folder, weights, inherit_from=self.inherit_from)
        try:
            loss = self.score(folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        self.curve.append(Candidate(weights, loss))
        return loss


def check_grid(grid: Sequence[float]) -> list[float]:
    values = [float(w) for w in grid]
    if not values or any(not 0.0 <= w <= 1.0 for w in values):
        raise UserError(f"weight grid must be a non-empty list of weights in [0, 1], got {list(grid)}")
    return values


def _grid_search(candidates: _Candidates, grid: Sequence[float]) -> tuple[tuple[float, ...], float]:
    best: tuple[tuple[float, ...], float] | None = None
    for w in check_grid(grid):
        weights = (w, round(1.0 - w, 12))
        loss = candidates(weights)
        if best is None or _comparable(loss) < _comparable(best[1]):
            best = (weights, loss)
    assert best is not None
    return best


def _greedy_soup(candidates: _Candidates, count: int) -> tuple[tuple[float, ...], float]:
    def uniform(members: Sequence[int]) -> tuple[float, ...]:
        return tuple(1.0 / len(members) if i in members else 0.0 for i in range(count))

    alone = [candidates(uniform([i])) for i in range(count)]
    ranked = sorted(range(count), key=lambda i: (_comparable(alone[i]), i))
    soup, best_loss = [ranked[0]], alone[ranked[0]]
    for index in ranked[1:]:
        loss = candidates(uniform(soup + [index]))
        if _comparable(loss) < _comparable(best_loss):
            soup, best_loss = soup + [index], loss
    return uniform(soup), best_loss


def search_average_weights(
    model_dirs: Sequence[str | Path],
    score: Score,
    *,
    grid: Sequence[float] = DEFAULT_GRID,
    inherit_from: int = -1,
    output_dir: str | Path | None = None,
    overwrite: bool = False,
    scratch_dir: str | Path | None = None,
) -> WeightSearchResult:
    """Choose averaging weights for ``model_dirs`` by ``score`` (e.g. :func:`answer_loss_scorer`).

    Two models: the weight grid (``grid`` holds the first model's weight). More: greedy soup.
    ``inherit_from``: the input whose config/tokenizer files every average gets (the tutorial:
    the last, recipe-2). ``scratch_dir``: where candidates are written (default: beside
    ``output_dir``, or the system's temporary folder). With ``output_dir`` the chosen average is
    written there. Input problems raise before anything is scored.
    """
    models = [Path(m) for m in model_dirs]
    missing = [str(m) for m in models if not m.is_dir()]
    if missing:
        raise UserError(f"model folder not found: {', '.join(missing)}")
    if len(models) < 2:
        raise UserError(f"a weight search needs at least two models, got {len(models)}")
    if len(models) == 2:
        check_grid(grid)
    if not -len(models) <= inherit_from < len(models):
        raise UserError(f"inherit_from={inherit_from} is not one of the {len(models)} models")
    try:
        check_compatible([read_checkpoint(m) for m in models])
    except AverageError as exc:
        raise UserError(str(exc)) from exc
    output = Path(output_dir) if output_dir is not None else None
    if output is not None and output.exists() and not overwrite:
        raise UserError(f"output {output} already exists (pass overwrite to replace it)")
    parent = Path(scratch_dir) if scratch_dir is not None else (output.parent if output is not None else None)
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".weight-search-", dir=parent) as scratch:
        candidates = _Candidates(models, score, Path(scratch), inherit_from)
        try:
            if len(models) == 2:
                weights, loss = _grid_search(candidates, grid)
                method = "grid"
            else:
                weights, loss = _greedy_soup(candidates, len(models))
                method = "greedy_soup"
            if output is not None:
                average_checkpoints(models, output, weights, inherit_from=inherit_from, overwrite=overwrite)
        except AverageError as exc:
            raise UserError(str(exc)) from exc
    return WeightSearchResult(method, candidates.curve, weights, loss, output)
