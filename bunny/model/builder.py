"""Building a Bunny model from a plain local LLM checkpoint and a local vision tower."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig

from bunny.model.families import LLMFamily, get_family

_NOT_CONFIG_FIELDS = ("model_type", "architectures", "transformers_version", "auto_map")
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "flash_attention_2", "eager")


def resolve_attn_implementation(requested: str | None, dtype: torch.dtype | None) -> str | None:
    """``auto`` picks ``flash_attention_2`` where the flash-attn package is installed and usable
    (CUDA present) and the weights are bf16/fp16, the only dtypes its kernels take: it skips the
    padded positions of a batch instead of masking them. Anything else gets PyTorch's SDPA."""
    if requested != "auto":
        return requested
    from transformers.utils import is_flash_attn_2_available

    if dtype in (torch.bfloat16, torch.float16) and is_flash_attn_2_available():
        return "flash_attention_2"
    return "sdpa"


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
    attn_implementation: str | None = "auto",
):
    """LLM weights from ``llm_path``; tower weights from ``vision_tower``; a new projector
    (or the pretrain stage's, from ``pretrain_mm_mlp_adapter``). ``attn_implementation``:
    one of ``ATTN_IMPLEMENTATIONS`` (see :func:`resolve_attn_implementation`), or None for
    the checkpoint's default."""
    family = get_family(model_type)
    if not Path(vision_tower).is_dir():
        raise FileNotFoundError(f"--vision_tower {vision_tower}: folder not found")
    config = bunny_config_from_llm(llm_path, family)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    attn_implementation = resolve_attn_implementation(attn_implementation, dtype)
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
