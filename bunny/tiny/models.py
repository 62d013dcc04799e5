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
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.utils import logging as hf_logging

from bunny.tiny.tokenizer import LLM_LEARNED_VOCAB_SIZE, WHOLE_WORDS, build_tiny_tokenizer

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


def save_tiny_llm(folder: Path, seed: int, pretrain_steps: int = 0) -> None:
    """Save a tiny Phi-3 causal LM and its tokenizer (with BOS; the data's answer words whole) in `folder`.

    Randomly initialised (its `lm_head` at `LM_HEAD_INIT_STD`, see there, the rest at Phi-3's
    defaults), then, with `pretrain_steps`, pre-trained on text about patch grids
    (`bunny.tiny.pretraining`).
    """
    tokenizer = build_tiny_tokenizer(add_bos=True, whole_words=WHOLE_WORDS, learned_vocab_size=LLM_LEARNED_VOCAB_SIZE)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Phi3ForCausalLM(tiny_phi3_config(tokenizer))
        with torch.no_grad():
            model.lm_head.weight.normal_(0.0, LM_HEAD_INIT_STD)
        if pretrain_steps:
            from bunny.tiny.pretraining import pretrain_tiny_llm

            pretrain_tiny_llm(model, tokenizer, seed, TINY_IMAGE_SIZE, pretrain_steps)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    with _no_progress_bars():
        model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def save_tiny_vision_tower(folder: Path, seed: int, patch_features: bool = False) -> None:
    """Save a tiny SigLIP vision tower and its image processor in `folder`: randomly
    initialised, or (`patch_features`) with features that carry each patch's colours
    (`bunny.tiny.pretraining.set_patch_features`)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        model = SiglipVisionModel(tiny_siglip_config())
    if patch_features:
        from bunny.tiny.pretraining import set_patch_features

        set_patch_features(model)
    with _no_progress_bars():
        model.save_pretrained(folder)
    tiny_siglip_image_processor().save_pretrained(folder)


# --- Llama-3 and Qwen2 stand-ins (byte-level BPE tokenizers) ----------------------------
# Kept apart from the Phi-3 builders above: they exist so the templates and the model
# families other than Phi-3 run end to end on tiny assets.

LLAMA3_SPECIALS = {"bos": "<|begin_of_text|>", "eos": "<|end_of_text|>", "extra": ("<|eot_id|>",)}
QWEN2_SPECIALS = {"bos": None, "eos": "<|endoftext|>", "extra": ("<|im_start|>", "<|im_end|>")}


def build_tiny_byte_level_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE tokenizer with Llama-3's (``"llama3"``: BOS
    ``<|begin_of_text|>`` prepended, EOS ``<|end_of_text|>``, no pad) or Qwen2's (``"qwen2"``:
    no BOS, ``<|endoftext|>`` as EOS and pad) special tokens, trained on the tiny corpus."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from bunny.tiny.tokenizer import _builtin_corpus

    specials = {"llama3": LLAMA3_SPECIALS, "qwen2": QWEN2_SPECIALS}[family]
    names = [token for token in (specials["bos"], specials["eos"], *specials["extra"]) if token]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=480, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator(_builtin_corpus(), trainer)
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in names])
    bos = specials["bos"]
    if bos:
        bos_id = backend.token_to_id(bos)
        backend.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]),
        ])
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=specials["eos"],
        pad_token=None if bos else specials["eos"],
        extra_special_tokens=list(specials["extra"]),
        model_max_length=2048,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def _tiny_decoder_sizes() -> dict:
    return dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-5)


def _save_tiny_causal_lm(folder: Path, seed: int, model_class: type, config, tokenizer) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    with _no_progress_bars():
        model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def save_tiny_llama3(folder: Path, seed: int) -> None:
    """A randomly initialised tiny Llama (grouped-query attention, untied head) with a Llama-3-style tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_byte_level_tokenizer("llama3")
    config = LlamaConfig(vocab_size=len(tokenizer), tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, architectures=["LlamaForCausalLM"], **_tiny_decoder_sizes())
    _save_tiny_causal_lm(folder, seed, LlamaForCausalLM, config, tokenizer)


def save_tiny_qwen2(folder: Path, seed: int) -> None:
    """A randomly initialised tiny Qwen2 (grouped-query attention, tied embeddings as the small
    Qwen2 models have) with a Qwen2-style tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tiny_byte_level_tokenizer("qwen2")
    config = Qwen2Config(vocab_size=len(tokenizer), tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, architectures=["Qwen2ForCausalLM"], **_tiny_decoder_sizes())
    _save_tiny_causal_lm(folder, seed, Qwen2ForCausalLM, config, tokenizer)
