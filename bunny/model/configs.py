"""The Bunny config classes: each family's config under its own ``model_type``.

Kept apart from the modeling classes so that AutoConfig's registration imports config
code only (see ``bunny.model.registry``).
"""

from __future__ import annotations

from transformers import AutoConfig, LlamaConfig, Phi3Config, Qwen2Config

from bunny.model.registry import register_wanted


class BunnyPhi3Config(Phi3Config):
    model_type = "bunny-phi3"


class BunnyLlamaConfig(LlamaConfig):
    model_type = "bunny-llama"


class BunnyQwen2Config(Qwen2Config):
    model_type = "bunny-qwen2"


CONFIG_CLASSES = (BunnyPhi3Config, BunnyLlamaConfig, BunnyQwen2Config)


def register() -> None:
    """Make saved Bunny configs load with AutoConfig (no remote code)."""
    for config_class in CONFIG_CLASSES:
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)


register_wanted(finishing=__name__)
