"""Asking a trained Bunny model questions: ``load_model`` + ``generate_answers``, or ``python -m bunny.generate``.

    from bunny.generate import Question, load_model, generate_answers
    loaded = load_model("bunny-demo/average/output")
    generate_answers(loaded, [Question("q1", "What shape is shown?", Path("image.png"))])
"""

from bunny.generate.answers import (
    GenerationSettings,
    Question,
    answer_batch,
    generate_answers,
    iter_answers,
    load_questions,
    questions_from_records,
)
from bunny.generate.loading import LoadedModel, ModelLoadError, load_model

__all__ = [
    "GenerationSettings",
    "LoadedModel",
    "ModelLoadError",
    "Question",
    "answer_batch",
    "generate_answers",
    "iter_answers",
    "load_model",
    "load_questions",
    "questions_from_records",
]
