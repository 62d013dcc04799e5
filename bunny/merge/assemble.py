"""The merged model in memory: base LLM + vision tower + projector + LoRA, merged in place.

Memory is the point. The base LLM is loaded once, by ``from_pretrained`` in the output dtype
(one copy of its weights); the tower and the projector are built straight from their weights
(the run's, or the frozen tower's original folder), so nothing is randomly initialised only to
be overwritten; each LoRA delta is added to its weight in place, one ``addmm`` per layer (PEFT's
own merge, kept for the adapters that need it, builds LoRA modules first and is several times
slower). Nothing is loaded twice and nothing is deep-copied.

Every key of the adapter and of ``non_lora_trainables.bin`` is first checked against a
skeleton of the model on the meta device (no memory, milliseconds), so a mismatch is reported,
with the keys named, before the base model is loaded at all.
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, inject_adapter_in_model, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from transformers.utils import logging as hf_logging

from bunny.merge.inputs import LoraRun, MergeError
from bunny.merge.options import MERGE_METHODS
from bunny.model.projector import build_projector
from bunny.model.vision_tower import VisionTower, tower_classes, upgrade_tower_key

PEFT_PREFIX = "base_model.model."
TOWER_PREFIX = "model.vision_tower."
PROJECTOR_PREFIX = "model.mm_projector."
MAX_LISTED_KEYS = 10
_ADAPTER_NAME = re.compile(r"\.default(?=\.|$)")


@dataclass(frozen=True)
class CheckedWeights:
    """The run's weights, checked against the model: keys without the PEFT prefix."""

    non_lora: dict[str, torch.Tensor]
    adapter: dict[str, torch.Tensor]  # keys as saved (PEFT prefix), for set_peft_model_state_dict
    lora_config: LoraConfig
    tower_trained: bool
    model_keys: frozenset[str]  # the state-dict keys of the merged model
    tower_unused_missing: tuple[str, ...] = ()  # a trained tower's unused parts the run lacks (older files)
    model_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # the merged model's tensors


def list_keys(keys: Sequence[str]) -> str:
    shown = ", ".join(sorted(keys)[:MAX_LISTED_KEYS])
    hidden = len(keys) - MAX_LISTED_KEYS
    return shown + (f" ... and {hidden} more" if hidden > 0 else "")


def model_skeleton(run: LoraRun) -> nn.Module:
    """The merged model's modules on the meta device: names and shapes, no memory."""
    with torch.device("meta"):
        return run.family.causal_lm_class(copy.deepcopy(run.config))


def refuse_non_finite(tensors: dict[str, torch.Tensor], where: Path | str) -> None:
    """A NaN or inf in an input would spread through every merged weight it touches."""
    bad = [name for name, value in tensors.items() if value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if bad:
        raise MergeError(f"{where} holds NaN or inf values in {list_keys(bad)}: refusing to merge them")


def _load_non_lora(run: LoraRun) -> dict[str, torch.Tensor]:
    """The run's non-LoRA tensors, keys without the PEFT prefix and in the original's tower
    layout (this project's earlier files are renamed on the fly, see ``upgrade_tower_key``)."""
    path = run.non_lora_file
    size = path.stat().st_size
    if size == 0:
        raise MergeError(f"{path} is empty (0 bytes): the run's save was cut short; merge another checkpoint-*")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # a torn or foreign file: pickle, zip and storage errors alike
        raise MergeError(
            f"{path} is corrupt or not a PyTorch file ({size} bytes, unreadable: {str(exc).splitlines()[0]})"
        ) from exc
    if not isinstance(saved, dict) or not all(isinstance(v, torch.Tensor) for v in saved.values()):
        raise MergeError(f"{path} is not a dict of tensors")
    refuse_non_finite(saved, path)
    return {upgrade_tower_key(key.removeprefix(PEFT_PREFIX)): value for key, value in saved.items()}


def check_non_lora(run: LoraRun, skeleton: nn.Module) -> tuple[dict[str, torch.Tensor], bool, tuple[str, ...]]:
    """The non-LoRA trainables, checked: every key is a weight of the model with its shape,
    the projector is complete, and so is the tower when it was trained (unfrozen). The tower's
    unused parts (after the feature layer) may be absent (this project's earlier files): they
    are returned, to be taken from the base tower."""
    state = _load_non_lora(run)
    expected = skeleton.state_dict()
    parameters = dict(skeleton.named_parameters())
    unexpected = [key for key in state if key not in expected]
    wrong_shape = [
        f"{key}: file {tuple(value.shape)} vs model {tuple(expected[key].shape)}"
        for key, value in state.items()
        if key in expected and value.shape != expected[key].shape
    ]
    tower_trained = any(key.startswith(TOWER_PREFIX) for key in state)
    if getattr(run.config, "unfreeze_vision_tower", False) and not tower_trained:
        raise MergeError(
            f"{run.non_lora_file} holds no vision tower weights, but {run.folder / 'config.json'} says "
            "unfreeze_vision_tower: the trained tower is lost"
        )
    unused = {TOWER_PREFIX + name for name in skeleton.get_model().vision_tower.unused_parameter_names()}
    required = [k for k in parameters if k.startswith(PROJECTOR_PREFIX) or (tower_trained and k.startswith(TOWER_PREFIX))]
    missing = [key for key in required if key not in state and key not in unused]
    unused_missing = tuple(key for key in required if key not in state and key in unused)
    problems = [
        f"keys that are not weights of the model: {list_keys([PEFT_PREFIX + k for k in unexpected])}" if unexpected else "",
        f"shapes that do not fit: {list_keys(wrong_shape)}" if wrong_shape else "",
        f"missing keys: {list_keys([PEFT_PREFIX + k for k in missing])}" if missing else "",
    ]
    if any(problems):
        raise MergeError(f"{run.non_lora_file} does not fit the model of {run.folder / 'config.json'}: "
                         + "; ".join(p for p in problems if p))
    return state, tower_trained, unused_missing


def check_adapter(run: LoraRun, skeleton: nn.Module) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The adapter's tensors must be exactly those PEFT creates for its config on this model.
    Injects (meta) LoRA layers into ``skeleton``."""
    try:
        lora_config = LoraConfig.from_pretrained(str(run.folder))
    except (OSError, ValueError, TypeError) as exc:
        raise MergeError(f"unreadable {run.adapter_config}: {exc}") from exc
    try:
        inject_adapter_in_model(lora_config, skeleton, low_cpu_mem_usage=True)
    except ValueError as exc:
        raise MergeError(
            f"{run.adapter_config}: target_modules {lora_config.target_modules!r} do not fit the model: {exc}"
        ) from exc
    expected = {
        _ADAPTER_NAME.sub("", key): value.shape for key, value in skeleton.state_dict().items() if "lora_" in key
    }
    try:
        saved = load_file(run.adapter_weights)
    except (SafetensorError, OSError) as exc:
        raise MergeError(f"{run.adapter_weights} is corrupt or not a safetensors file (unreadable: {exc})") from exc
    refuse_non_finite(saved, run.adapter_weights)
    found = {key.removeprefix(PEFT_PREFIX): value for key, value in saved.items()}
    unexpected = [PEFT_PREFIX + key for key in found if key not in expected]
    missing = [PEFT_PREFIX + key for key in expected if key not in found]
    wrong_shape = [
        f"{PEFT_PREFIX}{key}: file {tuple(value.shape)} vs adapter config {tuple(expected[key])}"
        for key, value in found.items()
        if key in expected and value.shape != expected[key]
    ]
    problems = [
        f"keys that fit no LoRA layer of the model: {list_keys(unexpected)}" if unexpected else "",
        f"missing keys: {list_keys(missing)}" if missing else "",
        f"shapes that do not fit (r={lora_config.r}): {list_keys(wrong_shape)}" if wrong_shape else "",
    ]
    if any(problems):
        raise MergeError(f"{run.adapter_weights} does not fit the model and {run.adapter_config}: "
                         + "; ".join(p for p in problems if p))
    return lora_config, {PEFT_PREFIX + key: value for key, value in found.items()}


def check_weights(run: LoraRun) -> CheckedWeights:
    """Every check of the run's weights against the model, before anything heavy is loaded."""
    skeleton = model_skeleton(run)
    model_shapes = {name: tuple(value.shape) for name, value in skeleton.state_dict().items()}
    model_keys = frozenset(model_shapes)
    non_lora, tower_trained, unused_missing = check_non_lora(run, skeleton)
    lora_config, adapter = check_adapter(run, skeleton)
    return CheckedWeights(non_lora, adapter, lora_config, tower_trained, model_keys, unused_missing, model_shapes)


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """from_pretrained's loading report would repeat what the checks below report precisely."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def _tower(run: LoraRun, dtype: torch.dtype, tower_path: Path | None, state: dict[str, torch.Tensor]) -> VisionTower:
    """The vision tower as the run used it: its trained weights from ``state`` (unfrozen), or
    the original ones from ``tower_path`` (frozen). A trained tower's unused parts that the
    run lacks (this project's earlier files) come from ``tower_path``. Every weight of the
    tower must come from somewhere: none is left randomly initialised."""
    config = dict(run.config.vision_tower_config)
    config_class, model_class = tower_classes(config.pop("model_type"))
    config = config_class(**config)
    prefix = TOWER_PREFIX + "vision_tower.vision_model."
    trained = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    if tower_path is None:
        source = {"pretrained_model_name_or_path": None, "state_dict": trained}
        where = str(run.non_lora_file)
    else:
        source = {"pretrained_model_name_or_path": str(tower_path)}
        where = f"vision tower {tower_path}"
    with _quiet_loading():
        encoder, info = model_class.from_pretrained(**source, config=config, dtype=dtype, output_loading_info=True)
    if tower_path is not None and trained:
        with torch.no_grad():
            own = encoder.state_dict()
            for name, value in trained.items():
                own[name].copy_(value)
        info["missing_keys"] = set(info["missing_keys"]) - set(trained)
        where = f"{run.non_lora_file} and vision tower {tower_path}"
    lacking = sorted(info["missing_keys"])
    if lacking:
        raise MergeError(f"{where} lacks weights of the tower: {list_keys(lacking)}")
    return VisionTower(encoder, run.config.mm_vision_select_layer)


def _trained_projector(run: LoraRun, state: dict[str, torch.Tensor], dtype: torch.dtype) -> nn.Module:
    with torch.device("meta"):
        projector = build_projector(run.config.mm_projector_type, run.config.mm_hidden_size, run.config.hidden_size)
    weights = {key.removeprefix(PROJECTOR_PREFIX): value.to(dtype) for key, value in state.items() if key.startswith(PROJECTOR_PREFIX)}
    projector.load_state_dict(weights, assign=True)
    return projector


def load_unmerged_model(
    run: LoraRun, model_base: Path, weights: CheckedWeights, tower_path: Path | None, dtype: torch.dtype
) -> nn.Module:
    """The Bunny model as trained, adapter not yet applied: base LLM weights, the tower
    (trained: from the run; frozen: from ``tower_path``) and the non-LoRA trainables.

    The LLM is loaded without its vision modules (a config without ``vision_tower_config``),
    which are then built straight from their weights: nothing is randomly initialised only
    to be overwritten (a so400m tower would cost seconds of it)."""
    llm_config = copy.deepcopy(run.config)
    llm_config.vision_tower_config = None
    llm_config.mm_vision_tower = None
    with _quiet_loading():
        model, info = run.family.causal_lm_class.from_pretrained(
            str(model_base), config=llm_config, dtype=dtype, output_loading_info=True
        )
    missing = sorted(info["missing_keys"])
    mismatched = [str(item) for item in info.get("mismatched_keys", [])]
    if missing or mismatched:
        raise MergeError(
            f"--model-base {model_base}: its weights do not fit the model "
            + "; ".join(p for p in (
                f"missing {list_keys(missing)}" if missing else "",
                f"mismatched {list_keys(mismatched)}" if mismatched else "",
            ) if p)
        )
    refuse_non_finite(model.state_dict(), f"--model-base {model_base}")
    model.config.vision_tower_config = run.config.vision_tower_config
    model.config.mm_vision_tower = run.config.mm_vision_tower
    bunny = model.get_model()
    bunny.vision_tower = _tower(run, dtype, tower_path, weights.non_lora)
    bunny.mm_projector = _trained_projector(run, weights.non_lora, dtype)
    state = model.state_dict()
    with torch.no_grad():  # any other non-LoRA trainable (none in Bunny's recipes) goes over the base
        for key, value in weights.non_lora.items():
            if not key.startswith((TOWER_PREFIX, PROJECTOR_PREFIX)):
                state[key].copy_(value)
    return model.eval()


def direct_merge_unsupported(config: LoraConfig) -> str | None:
    """Why ``W += scale * B @ A`` would not be what PEFT computes for this adapter (None: it is)."""
    reasons = {
        "use_dora": bool(getattr(config, "use_dora", False)),
        "fan_in_fan_out": bool(getattr(config, "fan_in_fan_out", False)),
        "rank_pattern": bool(getattr(config, "rank_pattern", None)),
        "alpha_pattern": bool(getattr(config, "alpha_pattern", None)),
        "bias": getattr(config, "bias", "none") != "none",
        "lora_bias": bool(getattr(config, "lora_bias", False)),
        "modules_to_save": bool(getattr(config, "modules_to_save", None)),
        "target_parameters": bool(getattr(config, "target_parameters", None)),
    }
    return next((name for name, unsupported in reasons.items() if unsupported), None)


def merge_adapter(model: nn.Module, weights: CheckedWeights, method: str = "direct") -> nn.Module:
    """Fold the adapter into ``model``'s weights, in place.

    ``direct`` (default): each target weight becomes ``W + scale * B @ A`` (scale
    ``lora_alpha / r``, or ``/ sqrt(r)`` with rsLoRA), one ``addmm`` per layer: no LoRA
    modules are built, nothing is copied. A float32 weight is updated in place; a bf16/fp16
    one is widened one layer at a time, updated in float32 and rounded once (PEFT rounds the
    delta to the weight's dtype first, then the sum: twice). Adapters whose merge is not that
    formula (DoRA, rank/alpha patterns, biases, ...) go through PEFT, as ``peft`` does always."""
    if method not in MERGE_METHODS:
        raise ValueError(f"merge method {method!r}: choose one of {', '.join(MERGE_METHODS)}")
    plain = all(key.endswith((".lora_A.weight", ".lora_B.weight")) for key in weights.adapter)
    if method == "peft" or not plain or direct_merge_unsupported(weights.lora_config):
        return _merge_with_peft(model, weights)
    config = weights.lora_config
    scale = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for module, (down, up) in _lora_pairs(weights.adapter).items():
            weight = parameters[module + ".weight"]
            if weight.dtype == torch.float32:
                weight.addmm_(up.float(), down.float(), alpha=scale)
            else:
                weight.copy_(torch.addmm(weight.float(), up.float(), down.float(), alpha=scale))
    _check_merged_keys(model, weights)
    return model


def _lora_pairs(adapter: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module name: (lora_A weight [r, in], lora_B weight [out, r])}`` from the adapter's
    tensors (checked against the model by :func:`check_adapter` already)."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in adapter.items():
        module, _, part = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        pairs.setdefault(module, {})[part] = value
    return {module: (parts["A.weight"], parts["B.weight"]) for module, parts in pairs.items()}


def _check_merged_keys(model: nn.Module, weights: CheckedWeights) -> None:
    keys = set(model.state_dict())
    if keys != weights.model_keys:
        raise RuntimeError(
            "the merged model's weights differ from the model's own layout: "
            f"extra {list_keys(sorted(keys - weights.model_keys))}, "
            f"missing {list_keys(sorted(weights.model_keys - keys))}"
        )


def _merge_with_peft(model: nn.Module, weights: CheckedWeights) -> nn.Module:
    """PEFT's own merge: LoRA layers injected, loaded, merged and unloaded.

    Adapter tensors narrower than the model (a bf16 adapter on a float32 merge) are widened
    first, so each delta is computed and rounded once, in the output precision."""
    dtype = next(model.parameters()).dtype
    adapter = {
        key: value.to(torch.promote_types(value.dtype, dtype)) if value.is_floating_point() else value
        for key, value in weights.adapter.items()
    }
    with warnings.catch_warnings():  # PEFT calls a transformers method deprecated in v5
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, weights.lora_config, low_cpu_mem_usage=True)
    set_peft_model_state_dict(peft_model, adapter, low_cpu_mem_usage=True)
    left_empty = [name for name, param in peft_model.named_parameters() if param.is_meta]
    if left_empty:
        raise MergeError(f"adapter tensors were not loaded: {list_keys(left_empty)}")
    merged = peft_model.merge_and_unload()
    _check_merged_keys(merged, weights)
    return merged
