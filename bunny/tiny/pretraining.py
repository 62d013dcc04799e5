"""What the real recipe starts from, in miniature: a vision tower whose features describe the
patches, and an LLM that has read about pictures.

Bunny starts from a pretrained SigLIP and Phi-3: the projector and LoRA only have to connect
them. Random tiny stand-ins know nothing, so in a CPU demo's few dozen steps the recipes learn
a constant answer. Here, once per asset build and seeded:

* the tower's patch embedding is set by hand to carry each patch's mean colour and its four
  quadrants' mean colours, its position embedding a one-hot of the patch, and its (one
  running) encoder layer starts as the identity: the features say what colour is where, as a
  pretrained tower's would;
* the LLM is pre-trained for about a minute on text only (``pretrain_tiny_llm``, a fresh batch
  of random scenes every step): a scene
  written as a 4x4 grid of "patch codes" (one token per patch, as the tower gives one feature
  per patch: the patch's colour, and whether the shape fills it or only part of it), then a
  caption or a question and answer about it in a plain ``Q: ... A: ...`` form. The LLM thus
  knows how to talk about a grid of patches, but not the chat template, and never sees an
  image feature: the pretrain stage must teach the projector to turn the tower's features
  into patch codes, and the recipes the chat format.
"""

from __future__ import annotations

import math
import random
import time

import numpy as np
import torch
from PIL import Image

from bunny.data.images import expand_to_square
from bunny.tiny.data import (
    COLORS,
    SHAPE_COLORS,
    SHORT_ANSWER_PROMPT,
    Scene,
    caption,
    draw_scene,
    draw_image_question,
    sample_scene,
)
from bunny.tiny.models import TINY_IMAGE_SIZE, TINY_PATCH_SIZE

GRID = TINY_IMAGE_SIZE // TINY_PATCH_SIZE  # patches per side
PAD_RGB = (127, 127, 127)  # the `pad` canvas: the SigLIP processor's mean 0.5, as bunny.data pads
PALETTE: dict[str, tuple[int, int, int]] = COLORS  # the pad canvas reads as "grey", as it looks
PARTIAL_SHARE = 0.2  # a patch whose pixels are at least this share shape counts as showing the shape
FULL_SHARE = 0.8  # ... and at least this share as filled by it
# One token per code; byte-fallback tokens of non-ASCII lead bytes, which no text of the data uses.
CODE_NAMES: tuple[str, ...] = (*PALETTE, *(f"{name}-part" for name in SHAPE_COLORS))
CODE_TOKENS: dict[str, str] = {name: f"<0x{0xC0 + index:02X}>" for index, name in enumerate(CODE_NAMES)}

POSITION_SCALE = 2.0  # the position one-hot's height: the colour channels span [-2, 2]
LLM_PRETRAIN_STEPS = 300
LLM_PRETRAIN_BATCH = 32
LLM_PRETRAIN_LR = 3e-3


def patch_codes(scene: Scene, pad: bool, size: int) -> list[str]:
    """The code of each of the GRID x GRID patches of `scene` as the tower sees it (`pad`: the
    recipes' `--image_aspect_ratio pad`, else `square`), in raster order."""
    image = draw_scene(scene)
    if pad:
        image = expand_to_square(image, PAD_RGB)
    pixels = np.asarray(image.resize((size, size), Image.Resampling.BICUBIC).convert("RGB"), dtype=np.int32)
    palette = np.array(list(PALETTE.values()), dtype=np.int32)
    labels = ((pixels[:, :, None, :] - palette) ** 2).sum(-1).argmin(-1)  # [size, size] palette index
    step = size // GRID
    patches = labels.reshape(GRID, step, GRID, step).transpose(0, 2, 1, 3).reshape(GRID * GRID, -1)
    names, shape_index = list(PALETTE), list(PALETTE).index(scene.color)
    codes: list[str] = []
    for patch in patches:
        share = float((patch == shape_index).mean())
        if share >= FULL_SHARE:
            codes.append(scene.color)
        elif share >= PARTIAL_SHARE:
            codes.append(f"{scene.color}-part")
        else:
            codes.append(names[int(np.bincount(patch, minlength=len(names)).argmax())])
    return codes


def _texts(scene: Scene, rng: random.Random) -> str:
    """A caption right after the patches (as the `plain` template puts it after the image), or
    a question and its answer on the next line, in a plain `Q: ... A: ...` form."""
    if rng.random() < 0.2:
        return caption(scene)
    question, short, long = draw_image_question(scene, rng)
    if rng.random() < 0.6:
        question, answer = f"{question} {SHORT_ANSWER_PROMPT}", short
    else:
        answer = long
    return f"\nQ: {question} A: {answer}"


def llm_corpus(rng: random.Random, n: int, size: int) -> list[tuple[list[str], str]]:
    """`n` (patch codes, text) pairs about fresh random scenes."""
    corpus = []
    for _ in range(n):
        scene = sample_scene(rng)
        corpus.append((patch_codes(scene, pad=rng.random() < 0.5, size=size), _texts(scene, rng)))
    return corpus


def _encode(tokenizer, codes: list[str], text: str) -> tuple[list[int], list[int]]:
    """Ids `<s> codes text \\n` and labels supervising the text only (the codes stand for an
    image: never predicted, as image positions never are)."""
    code_ids = tokenizer.convert_tokens_to_ids([CODE_TOKENS[code] for code in codes])
    text_ids = tokenizer(f"{text}\n", add_special_tokens=False).input_ids
    ids = [tokenizer.bos_token_id, *code_ids, *text_ids]
    return ids, [-100] * (1 + len(code_ids)) + text_ids


def pretrain_tiny_llm(model, tokenizer, seed: int, size: int, steps: int = LLM_PRETRAIN_STEPS) -> dict[str, float]:
    """Train every weight of `model` (a tiny causal LM) on `llm_corpus`, a fresh batch of
    scenes every step (nothing to memorise); returns first/last loss and seconds."""
    started = time.perf_counter()
    rng = random.Random(f"{seed}/llm-pretrain")
    optimizer = torch.optim.AdamW(model.parameters(), lr=LLM_PRETRAIN_LR, weight_decay=0.0)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps)))
    pad = tokenizer.pad_token_id
    model.train()
    losses = []
    for _ in range(steps):
        batch = [_encode(tokenizer, codes, text) for codes, text in llm_corpus(rng, LLM_PRETRAIN_BATCH, size)]
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([row + [pad] * (width - len(row)) for row, _ in batch])
        labels = torch.tensor([row + [-100] * (width - len(row)) for _, row in batch])
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row, _ in batch])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return {"first_loss": losses[0], "last_loss": sum(losses[-20:]) / min(20, len(losses)),
            "seconds": time.perf_counter() - started}


@torch.no_grad()
def set_patch_features(tower) -> None:
    """Make a SiglipVisionModel's features (after its first encoder layer) each patch's mean
    colour and its quadrants' mean colours (channels 0-14), plus a one-hot of the patch's
    position (channels 15 to 15 + patches - 1, from the position embedding; the rest zero):
    what colour is where, readable by a linear map, as a pretrained tower's features are."""
    embeddings = tower.embeddings
    conv = embeddings.patch_embedding
    patch = conv.kernel_size[0]
    half = patch // 2
    weight = torch.zeros_like(conv.weight)  # [hidden, 3, patch, patch]
    for channel in range(3):
        weight[channel, channel] = 2.0 / patch**2
        for quadrant in range(4):
            top, left = (quadrant // 2) * half, (quadrant % 2) * half
            weight[3 + 3 * quadrant + channel, channel, top:top + half, left:left + half] = 2.0 / half**2
    conv.weight.copy_(weight)
    conv.bias.zero_()
    positions = embeddings.position_embedding.weight  # [patches, hidden]
    positions.zero_()
    first = 3 + 3 * 4
    if first + positions.shape[0] > positions.shape[1]:
        raise ValueError(f"a tower of width {positions.shape[1]} has no room for {positions.shape[0]} position channels")
    positions[:, first:first + positions.shape[0]] = torch.eye(positions.shape[0]) * POSITION_SCALE
    for layer in tower.encoder.layers:  # each layer adds nothing to its input
        layer.self_attn.out_proj.weight.zero_()
        layer.self_attn.out_proj.bias.zero_()
        layer.mlp.fc2.weight.zero_()
        layer.mlp.fc2.bias.zero_()
