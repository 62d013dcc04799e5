"""Projectors from vision features to the LLM's embedding space, chosen by name.

``linear``        Linear(vision -> llm)
``mlp{N}x_gelu``  Linear(vision -> llm), then N-1 x (GELU, Linear(llm -> llm))
``identity``      no parameters; the vision width must equal the LLM width

Sequential layouts keep the original Bunny parameter names (``0.weight``, ``2.bias``, ...),
so ``mm_projector.bin`` files are interchangeable.
"""

from __future__ import annotations

import re

from torch import nn

_MLP_GELU = re.compile(r"^mlp(\d+)x_gelu$")
PROJECTOR_TYPES = ("linear", "mlp{N}x_gelu", "identity")


class IdentityProjector(nn.Module):
    def forward(self, features):
        return features


def is_known_projector(name: str) -> bool:
    return name in ("linear", "identity") or _MLP_GELU.match(name) is not None


def build_projector(name: str, vision_dim: int, llm_dim: int) -> nn.Module:
    if name == "linear":
        return nn.Linear(vision_dim, llm_dim)
    if name == "identity":
        if vision_dim != llm_dim:
            raise ValueError(
                f"--mm_projector_type identity needs equal widths, got vision {vision_dim} and LLM {llm_dim}"
            )
        return IdentityProjector()
    match = _MLP_GELU.match(name)
    if match is None or int(match.group(1)) < 1:
        raise ValueError(f"unknown --mm_projector_type {name!r}; known: {', '.join(PROJECTOR_TYPES)}")
    layers: list[nn.Module] = [nn.Linear(vision_dim, llm_dim)]
    for _ in range(int(match.group(1)) - 1):
        layers += [nn.GELU(), nn.Linear(llm_dim, llm_dim)]
    return nn.Sequential(*layers)
