"""Loading any trained Bunny model folder for inference, with every check done before use.

Accepted folders: a full model (merged, averaged, or the original Bunny's files), which loads
with ``AutoModelForCausalLM.from_pretrained``; a LoRA run's output (or one of its
``checkpoint-*``), merged on the fly into ``model_base`` through ``bunny.merge.merge_lora`` in
a temporary folder; a pretrain output (``mm_projector.bin``), put on ``model_base`` so the
pretrain-only model can be scored too. The tokenizer must fit the model's embedding and the
image processor comes from the folder (or, failing that, from the vision tower it names).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

import bunny  # noqa: F401  (registers the Bunny model classes with the Auto classes)
from bunny.cli import UserError
from bunny.conversation import get_template
from bunny.generate.settings import DEFAULT_TEMPLATE, DTYPE_NAMES

logger = logging.getLogger("bunny.generate")

DEFAULT_ASPECT_RATIO = "pad"  # what Bunny's recipes train with
DEFAULT_MAX_LENGTH = 2048
ADAPTER_CONFIG = "adapter_config.json"
PROJECTOR_FILE = "mm_projector.bin"
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


class ModelLoadError(UserError):
    """A model folder that cannot be used: missing, incomplete, or with a tokenizer that does not fit."""


@dataclass
class LoadedModel:
    """A model ready for inference, with what it needs to turn text and images into inputs."""

    source: Path
    model: Any  # a Bunny *ForCausalLM in eval mode
    tokenizer: PreTrainedTokenizerBase
    image_processor: Any | None  # None: the folder has none, so only text-only questions work
    template: str
    image_aspect_ratio: str
    max_length: int

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def resolve_device(device: str | None) -> torch.device:
    """``None``/``auto``: the first GPU when there is one, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype | str:
    """``None``/``auto``: float32 on the CPU (bf16 matmuls are slow there), the saved dtype on a GPU."""
    if dtype in (None, "auto"):
        return torch.float32 if device.type == "cpu" else "auto"
    if dtype not in DTYPES:
        raise ModelLoadError(f"--dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _load_tokenizer(folder: Path, model_path: Path) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as exc:
        raise ModelLoadError(f"model {model_path}: cannot load a tokenizer from {folder} ({exc})") from exc
    if not tokenizer.is_fast:
        raise ModelLoadError(f"model {model_path}: the tokenizer in {folder} is not a fast tokenizer "
                             "(label masking and prompts need its offset mapping)")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    return tokenizer


def check_tokenizer_fits(model: Any, tokenizer: PreTrainedTokenizerBase, model_path: Path) -> None:
    """Refuse a tokenizer whose ids the model cannot embed, or that has no end-of-text token."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ModelLoadError(
            f"model {model_path}: mismatched tokenizer: it has {len(tokenizer)} tokens but the model embeds "
            f"{rows} (vocab_size {getattr(model.config, 'vocab_size', '?')}); is this the tokenizer it was trained with?"
        )
    if tokenizer.eos_token_id is None:
        raise ModelLoadError(f"model {model_path}: its tokenizer has no eos_token, so answers cannot end")


def _load_image_processor(folder: Path, config: Any) -> Any | None:
    candidates = [folder]
    tower = getattr(config, "mm_vision_tower", None)
    if tower:
        candidates.append(Path(tower))
    for candidate in candidates:
        if (candidate / "preprocessor_config.json").is_file():
            return AutoImageProcessor.from_pretrained(str(candidate))
    return None


def _from_pretrained(folder: Path, model_path: Path, device: torch.device, dtype: torch.dtype | str) -> Any:
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"model {model_path}: cannot load the weights in {folder} ({exc})") from exc
    return model.to(device).eval()


def _merged_lora(folder: Path, model_base: Path | None, scratch: Path) -> Path:
    from bunny.merge import MergeError, merge_lora

    if model_base is None:
        raise ModelLoadError(f"model {folder} is a LoRA run: pass --model-base (the LLM it was trained on) "
                             "to merge it on the fly, or merge it first with python -m bunny.merge")
    try:
        return merge_lora(folder, model_base, scratch / "merged").output_dir
    except MergeError as exc:
        raise ModelLoadError(f"model {folder}: cannot merge the LoRA run ({exc})") from exc


def _pretrain_only(folder: Path, model_base: Path | None, device: torch.device, dtype: torch.dtype | str) -> Any:
    """The base LLM + the config's vision tower + this pretrain stage's projector."""
    from bunny.model.builder import build_bunny_model
    from bunny.model.families import FAMILIES

    if model_base is None:
        raise ModelLoadError(f"model {folder} is a pretrain output ({PROJECTOR_FILE}): pass --model-base "
                             "(the LLM it was trained with) to score the pretrain-only model")
    config = AutoConfig.from_pretrained(str(folder))
    family = next((f for f in FAMILIES.values() if f.config_class.model_type == config.model_type), None)
    tower = getattr(config, "mm_vision_tower", None)
    if family is None or not tower or not Path(tower).is_dir():
        raise ModelLoadError(f"model {folder}: its config.json does not name a Bunny model type and an existing "
                             f"vision tower (model_type {config.model_type!r}, mm_vision_tower {tower!r})")
    model = build_bunny_model(
        model_base, family.name, tower, config.mm_projector_type, config.mm_vision_select_layer,
        pretrain_mm_mlp_adapter=folder / PROJECTOR_FILE, dtype=dtype if isinstance(dtype, torch.dtype) else None,
    )
    for field in ("image_aspect_ratio", "tokenizer_model_max_length"):
        if getattr(config, field, None) is not None:
            setattr(model.config, field, getattr(config, field))
    return model.to(device).eval()


def load_model(
    path: str | Path,
    *,
    model_base: str | Path | None = None,
    template: str = DEFAULT_TEMPLATE,
    device: str | None = None,
    dtype: str | None = None,
) -> LoadedModel:
    """Load the model in ``path`` (see the module docstring for the folders accepted).

    ``model_base``: the base LLM, needed for a LoRA run or a pretrain output only.
    ``template``: the conversation template of the prompts (``--version`` in training).
    Raises :class:`ModelLoadError` naming the folder for anything that makes it unusable.
    """
    path = Path(path)
    base = Path(model_base) if model_base is not None else None
    try:
        get_template(template)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from exc
    if not path.is_dir():
        raise ModelLoadError(f"model folder not found: {path}")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"model {path}: no config.json (expected a merged, averaged or original Bunny model "
                             "folder, or a LoRA run / pretrain output with --model-base)")
    if base is not None and not (base / "config.json").is_file():
        raise ModelLoadError(f"--model-base {base}: no config.json there (expected the base LLM's folder)")
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)

    if (path / ADAPTER_CONFIG).is_file():
        with tempfile.TemporaryDirectory(prefix="bunny-merge-", dir=path.parent) as scratch:
            merged = _merged_lora(path, base, Path(scratch))
            model = _from_pretrained(merged, path, torch_device, torch_dtype)
            tokenizer = _load_tokenizer(merged, path)
            processor = _load_image_processor(merged, model.config)
    elif (path / PROJECTOR_FILE).is_file():
        model = _pretrain_only(path, base, torch_device, torch_dtype)
        tokenizer = _load_tokenizer(base, path)  # type: ignore[arg-type]
        processor = _load_image_processor(Path(model.config.mm_vision_tower), model.config)
    else:
        model = _from_pretrained(path, path, torch_device, torch_dtype)
        tokenizer = _load_tokenizer(path, path)
        processor = _load_image_processor(path, model.config)
    check_tokenizer_fits(model, tokenizer, path)
    return LoadedModel(
        source=path,
        model=model,
        tokenizer=tokenizer,
        image_processor=processor,
        template=template,
        image_aspect_ratio=getattr(model.config, "image_aspect_ratio", None) or DEFAULT_ASPECT_RATIO,
        max_length=getattr(model.config, "tokenizer_model_max_length", None) or DEFAULT_MAX_LENGTH,
    )
