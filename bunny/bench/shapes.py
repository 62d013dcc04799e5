"""Model shapes of the benchmark and the model-FLOP count of the clean loop.

``REFERENCE`` holds the published shapes of Bunny-v1.0-4B's parts, as the reference clean loop
(``shared/reference/clean_loop.py``) builds them: Phi-3-mini-4k-instruct and SigLIP
so400m-patch14-384. ``TINY`` shrinks the widths and depths as the clean loop's ``--tiny`` does and
keeps the vocabulary, image size and patch size, so sequence lengths stay real. The shapes live
here, not in a file of ``shared/``, because the GPU machine gets only the checkout.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property

import torch
from transformers import Phi3Config, Phi3ForCausalLM, SiglipVisionConfig, SiglipVisionModel

PHI3_MINI = dict(
    vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=32, hidden_act="silu", max_position_embeddings=4096, original_max_position_embeddings=4096,
    rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=32000,
    pad_token_id=32000,
)
SIGLIP_SO400M_384 = dict(
    hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, num_channels=3,
    image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
)


@dataclass(frozen=True)
class Shapes:
    """One model size: the LLM and vision-tower config fields the benchmark sets."""

    name: str
    llm: dict = field(hash=False)
    vision: dict = field(hash=False)

    @property
    def image_tokens(self) -> int:
        return (self.vision["image_size"] // self.vision["patch_size"]) ** 2

    def llm_config(self, **overrides) -> Phi3Config:
        return Phi3Config(**{**self.llm, **overrides}, architectures=["Phi3ForCausalLM"])

    def vision_config(self) -> SiglipVisionConfig:
        return SiglipVisionConfig(**self.vision, architectures=["SiglipVisionModel"])

    @cached_property
    def parameter_counts(self) -> tuple[int, int]:
        """(LLM, full SigLIP vision model) parameters, counted on the meta device as the clean
        loop counts them (the vision model with its post-layernorm and pooling head)."""
        with torch.device("meta"):
            llm = Phi3ForCausalLM(self.llm_config())
            vision = SiglipVisionModel(self.vision_config())
        return sum(p.numel() for p in llm.parameters()), sum(p.numel() for p in vision.parameters())

    def model_flops_per_sample(self, sequence: int, vision_trains: bool = False) -> float:
        """Model FLOPs of one training sample, counted exactly as the clean loop counts them:
        vision forward + LLM forward + LLM activation-gradient backward (LoRA weight gradients
        are left out as small), with the non-embedding LLM parameters. With a trained vision
        tower its backward (activation and weight gradients, 4 x forward's 2) is added."""
        llm_params, vision_params = self.parameter_counts
        hidden, vocab = self.llm["hidden_size"], self.llm["vocab_size"]
        non_embedding = llm_params - 2 * vocab * hidden
        flops = 2 * vision_params * self.image_tokens + 4 * non_embedding * sequence + 4 * hidden * vocab * sequence
        if vision_trains:
            flops += 4 * vision_params * self.image_tokens
        return float(flops)


REFERENCE = Shapes("reference", PHI3_MINI, SIGLIP_SO400M_384)
TINY = Shapes(
    "tiny",
    {**PHI3_MINI, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
     "num_key_value_heads": 4},
    {**SIGLIP_SO400M_384, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
)
SHAPES = {shapes.name: shapes for shapes in (REFERENCE, TINY)}


def deep_tiny(shapes: Shapes = TINY) -> Shapes:
    """Tiny widths at the reference depths (32 LLM layers, 27 tower layers): on the CPU its step
    time is mostly framework overhead per module, which is what ZeRO-3's hooks add."""
    return replace(
        shapes,
        name="tiny-deep",
        llm={**shapes.llm, "num_hidden_layers": PHI3_MINI["num_hidden_layers"]},
        vision={**shapes.vision, "num_hidden_layers": SIGLIP_SO400M_384["num_hidden_layers"]},
    )


SHAPES["tiny-deep"] = deep_tiny()
