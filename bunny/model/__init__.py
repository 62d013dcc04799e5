"""Bunny models: LLM families with a vision tower and projector, registered with Auto classes."""

from bunny.model.families import FAMILIES, LLMFamily, get_family, register_auto_classes
from bunny.model.multimodal import BunnyMetaForCausalLM, BunnyMetaModel, splice_image_features
from bunny.model.projector import build_projector
from bunny.model.vision_tower import VisionTower

register_auto_classes()

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
