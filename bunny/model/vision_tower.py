"""The vision tower: a SigLIP (or CLIP) encoder whose features come from one layer.

Bunny feeds the LLM the patch features of the second-to-last encoder layer
(``mm_vision_select_layer = -2``). The module keeps the whole checkpoint, in the original
Bunny's key layout (``vision_tower.vision_model.*``: every layer, the post-layernorm and the
head), so the files this project writes load strictly in the original's code and theirs load
here. Only the layers up to the feature layer run, though: the ones after it, the
post-layernorm and the head never influence the features, so they are skipped at compute
time and stay frozen even when the tower is trained (they would be trainable parameters
without gradients; in the original they get none either and keep their values).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    PretrainedConfig,
    SiglipVisionConfig,
    SiglipVisionModel,
)

# This project's files before the original's layout was adopted named the tower's tensors
# ``...vision_tower.vision_tower.<name>`` (no ``vision_model.``) and held only the used layers.
_LEGACY_TOWER_KEY = re.compile(r"(^|\.)vision_tower\.vision_tower\.(?!vision_model\.)")

# model_type of the tower's config -> (config class, model class, drops a CLS token)
_TOWER_KINDS: dict[str, tuple[type, type, bool]] = {
    "siglip_vision_model": (SiglipVisionConfig, SiglipVisionModel, False),
    "clip_vision_model": (CLIPVisionConfig, CLIPVisionModel, True),
}
# Full two-tower checkpoints (vision + text) whose vision half we take.
_FULL_MODEL_TYPES = {"siglip": "siglip_vision_model", "clip": "clip_vision_model"}


def tower_classes(model_type: str) -> tuple[type, type]:
    """``(config class, model class)`` of a supported tower's ``model_type``."""
    if model_type not in _TOWER_KINDS:
        raise ValueError(f"vision tower model_type {model_type!r} is not supported ({', '.join(_TOWER_KINDS)})")
    config_class, model_class, _ = _TOWER_KINDS[model_type]
    return config_class, model_class


def upgrade_tower_key(key: str) -> str:
    """A tower tensor's name in the original Bunny's layout (``vision_model.`` inserted into
    the names this project's earlier files used); any other name is returned as is."""
    return _LEGACY_TOWER_KEY.sub(r"\1vision_tower.vision_tower.vision_model.", key, count=1)


def read_vision_config(path: str | Path) -> PretrainedConfig:
    """Load the vision config of a local SigLIP/CLIP checkpoint (vision-only or two-tower)."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"--vision_tower {path}: no config.json there (expected a local SigLIP or CLIP checkpoint)")
    config = PretrainedConfig.get_config_dict(str(path))[0]
    model_type = config.get("model_type", "")
    if model_type in _FULL_MODEL_TYPES:
        config = {**config["vision_config"], "model_type": _FULL_MODEL_TYPES[model_type]}
        model_type = config["model_type"]
    if model_type not in _TOWER_KINDS:
        known = ", ".join([*_TOWER_KINDS, *_FULL_MODEL_TYPES])
        raise ValueError(f"--vision_tower {path}: model_type {model_type!r} is not a supported tower ({known})")
    config_class = _TOWER_KINDS[model_type][0]
    return config_class(**{k: v for k, v in config.items() if k != "model_type"})


class _VisionModelSlot(nn.Module):
    """Holds a transformers-5 vision model under ``vision_model``: transformers 4 nested it
    there, and the original Bunny's files name the tower's tensors that way."""

    def __init__(self, vision_model: nn.Module):
        super().__init__()
        self.vision_model = vision_model


class VisionTower(nn.Module):
    """Pixels [N, 3, H, W] -> patch features [N, num_patches, hidden_size]."""

    def __init__(self, encoder: nn.Module, select_layer: int = -2):
        super().__init__()
        model_type = encoder.config.model_type
        self.drops_cls_token = _TOWER_KINDS[model_type][2]
        num_layers = len(encoder.encoder.layers)
        keep = num_layers + 1 + select_layer if select_layer < 0 else select_layer
        if not 1 <= keep <= num_layers:
            raise ValueError(f"mm_vision_select_layer {select_layer} is outside a {num_layers}-layer tower")
        self.num_feature_layers = keep  # layers that run: the feature layer and those before it
        self.vision_tower = _VisionModelSlot(encoder)  # keys: vision_tower.vision_tower.vision_model.*
        for module in self.unused_modules():
            module.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, path: str | Path, select_layer: int = -2, **kwargs) -> "VisionTower":
        config = read_vision_config(path)
        model_class = tower_classes(config.model_type)[1]
        encoder = model_class.from_pretrained(str(path), config=config, **kwargs)
        return cls(encoder, select_layer)

    @classmethod
    def from_config(cls, config: dict, select_layer: int = -2) -> "VisionTower":
        """Build an uninitialised tower from a config dict (weights come from a saved Bunny model)."""
        config_class, model_class = tower_classes(config["model_type"])
        encoder = model_class(config_class(**{k: v for k, v in config.items() if k != "model_type"}))
        return cls(encoder, select_layer)

    @property
    def vision_model(self) -> nn.Module:
        """The transformers vision model (``SiglipVisionModel`` / ``CLIPVisionModel``)."""
        return self.vision_tower.vision_model

    def unused_modules(self) -> list[nn.Module]:
        """The parts after the feature layer: kept for the checkpoint, never run."""
        model = self.vision_model
        unused = list(model.encoder.layers[self.num_feature_layers:]) + [model.post_layernorm]
        return unused + ([model.head] if getattr(model, "head", None) is not None else [])

    def unused_parameter_names(self) -> set[str]:
        """Names (relative to this module) of the parameters that never take part in the features."""
        ids = {id(p) for module in self.unused_modules() for p in module.parameters()}
        return {name for name, p in self.named_parameters() if id(p) in ids}

    def requires_grad_(self, requires_grad: bool = True) -> "VisionTower":
        """Unfreezing the tower trains what computes the features; the unused parts stay frozen."""
        super().requires_grad_(requires_grad)
        for module in self.unused_modules():
            module.requires_grad_(False)
        return self

    @property
    def config(self) -> PretrainedConfig:
        return self.vision_model.config

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_patches(self) -> int:
        return (self.config.image_size // self.config.patch_size) ** 2

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # No torch.no_grad() here: a frozen tower builds no graph anyway (its parameters do
        # not require grad), and an unfrozen one must build it to be trained at all.
        model = self.vision_model
        hidden = model.embeddings(images.to(model.embeddings.patch_embedding.weight.dtype))
        if hasattr(model, "pre_layrnorm"):  # CLIP normalises before its encoder
            hidden = model.pre_layrnorm(hidden)
        for layer in model.encoder.layers[: self.num_feature_layers]:
            hidden = layer(hidden, None)
        return hidden[:, 1:] if self.drops_cls_token else hidden
