"""Defaults and settings of ``bunny-evaluate`` that its parser needs: no torch, fast ``--help``."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_NEW_TOKENS = 64


@dataclass(frozen=True)
class EvalSettings:
    batch_size: int = 8
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    accuracy: bool = True  # greedy answers: the costly part; the weight search needs the loss only
    progress: bool = False
