"""LLM families: a Bunny model is a family's causal LM plus the multimodal mixins.

Adding a family is the three short classes below and one ``LLMFamily`` entry: the
family's own modeling code from transformers is used as is, never copied.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    Phi3Config,
    Phi3ForCausalLM,
    Phi3Model,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2Model,
)

from bunny.model.multimodal import BunnyMetaForCausalLM, BunnyMetaModel


# --- Phi-3 ---------------------------------------------------------------------------
class BunnyPhi3Config(Phi3Config):
    model_type = "bunny-phi3"


class BunnyPhi3Model(BunnyMetaModel, Phi3Model):
    config_class = BunnyPhi3Config


class BunnyPhi3ForCausalLM(BunnyMetaForCausalLM, Phi3ForCausalLM):
    config_class = BunnyPhi3Config
    base_model_class = BunnyPhi3Model


# --- Llama ---------------------------------------------------------------------------
class BunnyLlamaConfig(LlamaConfig):
    model_type = "bunny-llama"


class BunnyLlamaModel(BunnyMetaModel, LlamaModel):
    config_class = BunnyLlamaConfig


class BunnyLlamaForCausalLM(BunnyMetaForCausalLM, LlamaForCausalLM):
    config_class = BunnyLlamaConfig
    base_model_class = BunnyLlamaModel


# --- Qwen2 ---------------------------------------------------------------------------
class BunnyQwen2Config(Qwen2Config):
    model_type = "bunny-qwen2"


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


def register_auto_classes() -> None:
    """Make saved Bunny models load with AutoConfig / AutoModelForCausalLM (no remote code)."""
    for family in FAMILIES.values():
        AutoConfig.register(family.config_class.model_type, family.config_class, exist_ok=True)
        AutoModelForCausalLM.register(family.config_class, family.causal_lm_class, exist_ok=True)
