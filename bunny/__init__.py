"""Bunny: a clean-room library for training Bunny-style vision-language models.

Importing ``bunny`` is cheap (no torch, no transformers) and makes saved Bunny models load with
``AutoConfig`` / ``AutoModelForCausalLM.from_pretrained(path)``: the Bunny classes are
registered when transformers loads its Auto classes (``bunny.model.registry``).
"""

import bunny.model  # noqa: F401  (installs the lazy Auto-class registration)
