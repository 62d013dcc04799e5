"""LLM families: a Bunny model is a family's causal LM plus the multimodal mixins.

Adding a family is a config class in ``bunny.model.configs``, the two short classes below,
one ``LLMFamily`` entry and its name in ``registry.FAMILY_NAMES``: the family's own modeling
code from transformers is used as is, never copied.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import (
    AutoModelForCausalLM,
    LlamaForCausalLM,
    LlamaModel,
    Phi3ForCausalLM,
    Phi3Model,
    Qwen2ForCausalLM,
    Qwen2Model,
)

from bunny.model import configs
from bunny.model.configs import BunnyLlamaConfig, BunnyPhi3Config, BunnyQwen2Config
from bunny.model.multimodal import BunnyMetaForCausalLM, BunnyMetaModel
from bunny.model.registry import FAMILY_NAMES, register_wanted


# --- Phi-3 ---------------------------------------------------------------------------
class BunnyPhi3Model(BunnyMetaModel, Phi3Model):
    config_class = BunnyPhi3Config


class BunnyPhi3ForCausalLM(BunnyMetaForCausalLM, Phi3ForCausalLM):
    config_class = BunnyPhi3Config
    base_model_class = BunnyPhi3Model


# --- Llama ---------------------------------------------------------------------------
class BunnyLlamaModel(BunnyMetaModel, LlamaModel):
    config_class = BunnyLlamaConfig


class BunnyLlamaForCausalLM(BunnyMetaForCausalLM, LlamaForCausalLM):
    config_class = BunnyLlamaConfig
    base_model_class = BunnyLlamaModel


# --- Qwen2 ---------------------------------------------------------------------------
class BunnyQwen2Model(BunnyMetaModel, Qwen2Model):
    config_class = BunnyQwen2Config


class BunnyQwen2ForCausalLM(BunnyMetaForCausalLM, Qwen2ForCausalLM):
    config_class = BunnyQwen2Config
    base_model_class = BunnyQwen2Model


@dataclass(frozen=True)
class LLMFamily:
    name: str  # the --model_type value
    base_model_type: str  # model_type of the plain LLM checkpoint
    config_class: type
    causal_lm_class: type


FAMILIES: dict[str, LLMFamily] = {
    family.name: family
    for family in (
        LLMFamily("phi-3", "phi3", BunnyPhi3Config, BunnyPhi3ForCausalLM),
        LLMFamily("llama", "llama", BunnyLlamaConfig, BunnyLlamaForCausalLM),
        LLMFamily("qwen2", "qwen2", BunnyQwen2Config, BunnyQwen2ForCausalLM),
    )
}


def get_family(model_type: str) -> LLMFamily:
    if model_type not in FAMILIES:
        raise ValueError(f"unknown --model_type {model_type!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


assert tuple(FAMILIES) == FAMILY_NAMES, "registry.FAMILY_NAMES must name the FAMILIES"


def register() -> None:
    """Make saved Bunny models load with AutoConfig / AutoModelForCausalLM (no remote code)."""
    configs.register()
    for family in FAMILIES.values():
        AutoModelForCausalLM.register(family.config_class, family.causal_lm_class, exist_ok=True)


register_auto_classes = register  # its name before the registration became lazy
register_wanted(finishing=__name__)
