"""Defaults and settings of ``bunny-generate`` that its parser needs: no torch, fast ``--help``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DEFAULT_TEMPLATE = "phi3"
DTYPE_NAMES = ("float32", "bfloat16", "float16")  # --dtype values besides auto


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings, named as ``transformers``' ``generate`` names them. Greedy by default."""

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    num_beams: int = 1
    repetition_penalty: float | None = None
    seed: int = 0  # seeds sampling, so a sampled run is reproducible too

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample,
                                  "num_beams": self.num_beams, "use_cache": True}
        for name in ("temperature", "top_p", "top_k", "repetition_penalty"):
            if getattr(self, name) is not None:
                kwargs[name] = getattr(self, name)
        if not self.do_sample:  # the model's generation_config may carry sampling defaults
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs
