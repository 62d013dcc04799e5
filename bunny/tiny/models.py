"""Tiny random-weight stand-ins for Phi-3-mini and SigLIP-so400m, saved like real checkouts.

Same architectures and folder layouts as the real checkpoints (config.json, safetensors
weights, tokenizer or preprocessor files side by side), a few hundred kilobytes each, so the
training library runs its real loading code on them in seconds and without a network.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import (
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedTokenizerBase,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.utils import logging as hf_logging

from bunny.tiny.tokenizer import build_tiny_tokenizer

try:  # transformers >= 5 splits the PIL backend out; it saves as "SiglipImageProcessor" either way
    from transformers import SiglipImageProcessorPil as _SiglipImageProcessor
except ImportError:  # pragma: no cover - older transformers
    from transformers import SiglipImageProcessor as _SiglipImageProcessor

TINY_IMAGE_SIZE = 32
TINY_PATCH_SIZE = 8
# A trained LM's output layer is far from its 0.02-std initialisation: Phi-3-mini's logits span
# tens of nats. LoRA never trains `lm_head` (nor the final norm), so at 0.02 the tiny LLM's
# logits stay within about one nat of each other and no fine-tuning can make any answer likely
# (the loss is stuck near ln(vocab)). At 0.125 a hidden state aimed at a token's row gives
# that token a logit ~8 above the rest's spread of ~1 (p ~0.75): answers become learnable in
# a few dozen LoRA steps, as with a pretrained LLM. (0.25 learned slower at the demo's steps:
# held-out answer loss 3.75 after 100 steps vs 3.08 after 48 at 0.125.)
LM_HEAD_INIT_STD = 0.125


def tiny_phi3_config(tokenizer: PreTrainedTokenizerBase) -> Phi3Config:
    """Phi-3-mini's configuration shrunk to 2 layers of width 64, over the tiny tokenizer's vocabulary."""
    return Phi3Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        hidden_act="silu",
        max_position_embeddings=4096,
        original_max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        architectures=["Phi3ForCausalLM"],
    )


def tiny_siglip_config() -> SiglipVisionConfig:
    """SigLIP-so400m's vision configuration shrunk to 2 layers of width 32: 32 px / 8 px = 16 patch tokens."""
    return SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_channels=3,
        image_size=TINY_IMAGE_SIZE,
        patch_size=TINY_PATCH_SIZE,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
        architectures=["SiglipVisionModel"],
    )


def tiny_siglip_image_processor() -> _SiglipImageProcessor:
    """The so400m preprocessing (bicubic resize, mean = std = 0.5) at the tiny tower's resolution."""
    return _SiglipImageProcessor(
        size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        resample=3,  # PIL bicubic
        rescale_factor=1 / 255,
    )


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Hide the one-shard "Writing model shards" bar; restore the caller's setting after."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def save_tiny_llm(folder: Path, seed: int) -> None:
    """Save a randomly initialised tiny Phi-3 causal LM and its tokenizer (with BOS) in `folder`.

    Its `lm_head` is drawn at `LM_HEAD_INIT_STD` (see there), the rest at Phi-3's defaults.
    """
    tokenizer = build_tiny_tokenizer(add_bos=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Phi3ForCausalLM(tiny_phi3_config(tokenizer))
        with torch.no_grad():
            model.lm_head.weight.normal_(0.0, LM_HEAD_INIT_STD)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    with _no_progress_bars():
        model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def save_tiny_vision_tower(folder: Path, seed: int) -> None:
    """Save a randomly initialised tiny SigLIP vision tower and its image processor in `folder`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        model = SiglipVisionModel(tiny_siglip_config())
    with _no_progress_bars():
        model.save_pretrained(folder)
    tiny_siglip_image_processor().save_pretrained(folder)
