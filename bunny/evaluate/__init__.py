"""Judging trained models on held-out data, and choosing averaging weights on it.

``load_eval_data`` + ``evaluate_model`` (answer loss with training's masking, greedy answer
accuracy), ``write_results`` (per-record JSONL, summaries, table), ``search_average_weights``
(the weight grid for two models, greedy soup for more); ``python -m bunny.evaluate`` on the
command line.
"""

from bunny.lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "EvalData": "bunny.evaluate.evaluator",
    "EvalDataError": "bunny.evaluate.evaluator",
    "EvalResult": "bunny.evaluate.evaluator",
    "EvalSettings": "bunny.evaluate.evaluator",
    "EvalSummary": "bunny.evaluate.evaluator",
    "RecordResult": "bunny.evaluate.evaluator",
    "answer_loss": "bunny.evaluate.evaluator",
    "answer_losses": "bunny.evaluate.evaluator",
    "evaluate_model": "bunny.evaluate.evaluator",
    "load_eval_data": "bunny.evaluate.evaluator",
    "answers_match": "bunny.evaluate.normalize",
    "normalize_answer": "bunny.evaluate.normalize",
    "model_labels": "bunny.evaluate.results",
    "summary_table": "bunny.evaluate.results",
    "write_model_results": "bunny.evaluate.results",
    "write_results": "bunny.evaluate.results",
    "write_summary": "bunny.evaluate.results",
}, globals())

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
