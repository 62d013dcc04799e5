"""What a training stage writes: only its trainable weights, gathered under ZeRO-3.

- pretrain: ``mm_projector.bin`` (keys ``model.mm_projector.*``) and ``config.json``;
- LoRA: the PEFT adapter, ``non_lora_trainables.bin`` (projector, and the whole vision tower
  when unfrozen; PEFT-prefixed keys in the original Bunny's layout,
  ``base_model.model.model.vision_tower.vision_tower.vision_model.*``), ``config.json``, the
  tokenizer and the image processor.

These are written in the output folder and in every ``checkpoint-*``, so any checkpoint
can be merged. Files are written under temporary names and renamed, so a reader never sees a
half-written file.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from bunny.model.compat import save_config

PROJECTOR_FILE = "mm_projector.bin"
NON_LORA_FILE = "non_lora_trainables.bin"
TOWER_KEY = ".vision_tower.vision_tower."


def gather_parameters(named: list[tuple[str, nn.Parameter]]) -> dict[str, torch.Tensor]:
    """Full CPU copies of the given parameters; ZeRO-3 partitions are gathered first
    (every rank must call this: gathering is collective)."""
    partitioned = [param for _, param in named if hasattr(param, "ds_id")]
    if partitioned:
        import deepspeed

        with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
            return {name: param.detach().cpu().clone() for name, param in named}
    return {name: param.detach().cpu().clone() for name, param in named}


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, param) for name, param in model.named_parameters() if param.requires_grad]


def torch_save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def unwrap_bunny_model(model: nn.Module) -> nn.Module:
    """The Bunny causal LM inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def save_projector(model: nn.Module, output_dir: Path, is_main: bool) -> None:
    named = [(n, p) for n, p in model.named_parameters() if "mm_projector." in n]
    state = gather_parameters(named)
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(unwrap_bunny_model(model).config, output_dir)
        torch_save_atomic({_strip_peft_prefix(k): v for k, v in state.items()}, output_dir / PROJECTOR_FILE)


def non_lora_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """What ``non_lora_trainables.bin`` holds: the trainable non-LoRA parameters and, when the
    tower was trained, the whole tower, its frozen unused parts included (the layers after the
    feature layer, the post-layernorm, the head: copies of the base tower). The original
    Bunny's files hold the whole tower too, and its loader reads the tower strictly."""
    trained = {name for name, param in model.named_parameters() if param.requires_grad and "lora_" not in name}
    tower_trained = any(TOWER_KEY in name for name in trained)
    return [
        (name, param)
        for name, param in model.named_parameters()
        if name in trained or (tower_trained and TOWER_KEY in name and "lora_" not in name)
    ]


def save_lora(model: nn.Module, output_dir: Path, is_main: bool, processors=()) -> None:
    trainable = trainable_parameters(model)
    lora = gather_parameters([(n, p) for n, p in trainable if "lora_" in n])
    non_lora = gather_parameters(non_lora_parameters(model))
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        # save_embedding_layers=False: LoRA never touches the embeddings, and the check for
        # them would reload the base model's config on every save.
        model.save_pretrained(output_dir, state_dict=lora, save_embedding_layers=False)
        save_config(unwrap_bunny_model(model).config, output_dir)
        torch_save_atomic(non_lora, output_dir / NON_LORA_FILE)
        for processor in processors:
            processor.save_pretrained(output_dir)


def load_trainable_state(src: dict[str, torch.Tensor], dst: nn.Module) -> None:
    """Load a checkpoint's module state that may lack the frozen parameters (DeepSpeed's
    ``custom_load_fn``): those keep the values the stage loaded from its inputs. Any other
    key missing, or a key the model does not have, is an error naming them, as a strict load
    would be (a checkpoint of another stage or model is refused, not half-loaded)."""
    frozen = {name for name, param in dst.named_parameters(remove_duplicate=False) if not param.requires_grad}
    result = dst.load_state_dict(src, strict=False)
    missing = sorted(set(result.missing_keys) - frozen)
    if missing or result.unexpected_keys:
        raise RuntimeError(
            "the checkpoint does not fit the model: "
            f"missing trainable weights {missing[:10]}{' ...' if len(missing) > 10 else ''}, "
            f"unexpected keys {sorted(result.unexpected_keys)[:10]}"
        )


def _strip_peft_prefix(name: str) -> str:
    return name.removeprefix("base_model.model.")
