"""Random-weight model folders at the benchmark shapes, built once into a cache folder.

Each folder is laid out like the real checkout (``config.json``, safetensors, tokenizer or image
processor files), so ``train.py`` loads it with its normal code. The LLM's vocabulary is
Phi-3-mini's 32064 rows; the tokenizer is the tiny one (584 ids), whose ids all lie below
that, as Phi-3's own 32011-id tokenizer does: the embedding and ``lm_head`` have their real
sizes while the text stays cheap to generate. Weights are drawn on the GPU when there is one
(seconds for 4B parameters) and written in bf16. A folder is reused when its marker, written
last, records the same shapes.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModel, AutoModelForCausalLM

from bunny.bench.shapes import Shapes
from bunny.tiny.tokenizer import build_tiny_tokenizer

try:  # transformers >= 5 splits the PIL backend out; it saves as "SiglipImageProcessor" either way
    from transformers import SiglipImageProcessorPil as _SiglipImageProcessor
except ImportError:  # pragma: no cover - older transformers
    from transformers import SiglipImageProcessor as _SiglipImageProcessor

MARKER = "bench_models.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class BenchModels:
    llm: Path
    vision_tower: Path


def _spec(shapes: Shapes) -> dict:
    return {"format": FORMAT_VERSION, "llm": shapes.llm, "vision": shapes.vision}


def siglip_image_processor(image_size: int) -> _SiglipImageProcessor:
    """SigLIP so400m's preprocessing: bicubic resize to a square, mean = std = 0.5."""
    return _SiglipImageProcessor(
        size={"height": image_size, "width": image_size}, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
        resample=3, rescale_factor=1 / 255,
    )


def _build(folder: Path, shapes: Shapes, device: str, seed: int) -> None:
    tokenizer = build_tiny_tokenizer(add_bos=True)
    config = shapes.llm_config(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        llm = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        llm.save_pretrained(folder / "llm")
        del llm
        tower = AutoModel.from_config(shapes.vision_config(), dtype=torch.bfloat16)
        tower.save_pretrained(folder / "vision_tower")
        del tower
    tokenizer.save_pretrained(folder / "llm")
    siglip_image_processor(shapes.vision["image_size"]).save_pretrained(folder / "vision_tower")
    (folder / MARKER).write_text(json.dumps(_spec(shapes), indent=1))


def prepare_models(cache_dir: Path, shapes: Shapes, device: str | None = None, seed: int = 0) -> BenchModels:
    """``cache_dir/<shapes>/{llm,vision_tower}``, built unless a complete copy is there."""
    folder = Path(cache_dir).absolute() / shapes.name
    models = BenchModels(folder / "llm", folder / "vision_tower")
    marker = folder / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == json.loads(json.dumps(_spec(shapes))):
        return models
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    partial = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    _build(partial, shapes, device, seed)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return models


def describe(models: BenchModels) -> dict[str, str]:
    return {key: str(value) for key, value in asdict(models).items()}
