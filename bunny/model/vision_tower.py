"""The vision tower: a SigLIP (or CLIP) encoder cut at the feature layer Bunny uses.

Bunny feeds the LLM the patch features of the second-to-last encoder layer
(``mm_vision_select_layer = -2``). The layers after it, the post-layernorm and the pooling
head never influence those features, so they are removed at build time: they cost
compute, and with an unfrozen tower they would be trainable parameters without gradients.
The saved state dict therefore holds only the layers that are used.
"""

from __future__ import annotations

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
        encoder.encoder.layers = encoder.encoder.layers[:keep]
        encoder.post_layernorm = nn.Identity()
        if getattr(encoder, "use_head", False):
            encoder.use_head = False
            del encoder.head
        self.vision_tower = encoder  # attribute name keeps Bunny's key layout: vision_tower.vision_tower.*

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
    def config(self) -> PretrainedConfig:
        return self.vision_tower.config

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_patches(self) -> int:
        return (self.config.image_size // self.config.patch_size) ** 2

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # No torch.no_grad() here: a frozen tower builds no graph anyway (its parameters do
        # not require grad), and an unfrozen one must build it to be trained at all.
        dtype = self.vision_tower.embeddings.patch_embedding.weight.dtype
        features = self.vision_tower(pixel_values=images.to(dtype)).last_hidden_state
        return features[:, 1:] if self.drops_cls_token else features
