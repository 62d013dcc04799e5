"""Bunny: a clean-room library for training Bunny-style vision-language models.

Importing ``bunny`` registers the Bunny model classes with transformers' Auto classes, so a
saved Bunny model loads with ``AutoModelForCausalLM.from_pretrained(path)``.
"""

import bunny.model  # noqa: F401  (registers the Auto classes)
