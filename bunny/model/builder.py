"""Building a Bunny model from a plain local LLM checkpoint and a local vision tower."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig

from bunny.model.families import LLMFamily, get_family

_NOT_CONFIG_FIELDS = ("model_type", "architectures", "transformers_version", "auto_map")


def bunny_config_from_llm(llm_path: str | Path, family: LLMFamily) -> PretrainedConfig:
    """The Bunny config of a plain LLM checkpoint (or of a saved Bunny model, as is)."""
    llm_path = Path(llm_path)
    if not (llm_path / "config.json").is_file():
        raise FileNotFoundError(f"--model_name_or_path {llm_path}: no config.json there (expected a local model folder)")
    config = AutoConfig.from_pretrained(str(llm_path))
    if isinstance(config, family.config_class):
        return config
    if config.model_type != family.base_model_type:
        raise ValueError(
            f"--model_name_or_path {llm_path} is a {config.model_type!r} model, "
            f"but --model_type {family.name} expects {family.base_model_type!r}"
        )
    fields = {k: v for k, v in config.to_dict().items() if k not in _NOT_CONFIG_FIELDS}
    return family.config_class(**fields)


def build_bunny_model(
    llm_path: str | Path,
    model_type: str,
    vision_tower: str | Path,
    projector_type: str,
    select_layer: int = -2,
    pretrain_mm_mlp_adapter: str | Path | None = None,
    dtype: torch.dtype | None = None,
    attn_implementation: str | None = "sdpa",
):
    """LLM weights from ``llm_path``; tower weights from ``vision_tower``; a new projector
    (or the pretrain stage's, from ``pretrain_mm_mlp_adapter``)."""
    family = get_family(model_type)
    if not Path(vision_tower).is_dir():
        raise FileNotFoundError(f"--vision_tower {vision_tower}: folder not found")
    config = bunny_config_from_llm(llm_path, family)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = family.causal_lm_class.from_pretrained(str(llm_path), config=config, **kwargs)
    tower_kwargs = dict(kwargs)
    model.get_model().initialize_vision_modules(
        vision_tower, projector_type, select_layer, pretrain_mm_mlp_adapter, **tower_kwargs
    )
    if dtype is not None:
        model.get_model().mm_projector.to(dtype)
    return model
