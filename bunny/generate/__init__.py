"""Asking a trained Bunny model questions: ``load_model`` + ``generate_answers``, or ``python -m bunny.generate``.

    from bunny.generate import Question, load_model, generate_answers
    loaded = load_model("bunny-demo/average/output")
    generate_answers(loaded, [Question("q1", "What shape is shown?", Path("image.png"))])
"""

from bunny.lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "GenerationSettings": "bunny.generate.answers",
    "Question": "bunny.generate.answers",
    "answer_batch": "bunny.generate.answers",
    "generate_answers": "bunny.generate.answers",
    "iter_answers": "bunny.generate.answers",
    "load_questions": "bunny.generate.answers",
    "questions_from_records": "bunny.generate.answers",
    "LoadedModel": "bunny.generate.loading",
    "ModelLoadError": "bunny.generate.loading",
    "load_model": "bunny.generate.loading",
}, globals())

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
