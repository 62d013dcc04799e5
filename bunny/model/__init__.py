"""Bunny models: LLM families with a vision tower and projector, registered with Auto classes.

Importing this package is cheap (no torch, no transformers): the Auto classes learn the Bunny
classes when transformers loads them (``registry``), and the public names below are imported
on first use (PEP 562).
"""

from __future__ import annotations

from bunny.lazy import lazy_exports

from bunny.model.registry import install_auto_registration

_LAZY_NAMES = {
    "FAMILIES": "bunny.model.families",
    "LLMFamily": "bunny.model.families",
    "get_family": "bunny.model.families",
    "register_auto_classes": "bunny.model.families",
    "BunnyMetaForCausalLM": "bunny.model.multimodal",
    "BunnyMetaModel": "bunny.model.multimodal",
    "splice_image_features": "bunny.model.multimodal",
    "build_projector": "bunny.model.projector",
    "VisionTower": "bunny.model.vision_tower",
}

__all__ = [
    "FAMILIES",
    "BunnyMetaForCausalLM",
    "BunnyMetaModel",
    "LLMFamily",
    "VisionTower",
    "build_projector",
    "get_family",
    "splice_image_features",
]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY_NAMES, globals())


install_auto_registration()
