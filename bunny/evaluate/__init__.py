"""Judging trained models on held-out data, and choosing averaging weights on it.

``load_eval_data`` + ``evaluate_model`` (answer loss with training's masking, greedy answer
accuracy), ``write_results`` (per-record JSONL, summaries, table), ``search_average_weights``
(the weight grid for two models, greedy soup for more); ``python -m bunny.evaluate`` on the
command line.
"""

from bunny.evaluate.evaluator import (
    EvalData,
    EvalDataError,
    EvalResult,
    EvalSettings,
    EvalSummary,
    RecordResult,
    answer_loss,
    answer_losses,
    evaluate_model,
    load_eval_data,
)
from bunny.evaluate.normalize import answers_match, normalize_answer
from bunny.evaluate.results import model_labels, summary_table, write_model_results, write_results, write_summary

__all__ = [
    "EvalData",
    "EvalDataError",
    "EvalResult",
    "EvalSettings",
    "EvalSummary",
    "RecordResult",
    "answer_loss",
    "answer_losses",
    "answers_match",
    "evaluate_model",
    "load_eval_data",
    "model_labels",
    "normalize_answer",
    "summary_table",
    "write_model_results",
    "write_results",
    "write_summary",
]
