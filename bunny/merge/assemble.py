"""The run's weights checked against the model, and PEFT's merge in memory (the fallback).

Every key of the adapter and of ``non_lora_trainables.bin`` is first checked against a
skeleton of the model on the meta device (no memory, milliseconds), so a mismatch is reported,
with the keys named, before any weight of the base model is read. Plain LoRA adapters (all
that Bunny's trainer writes) are checked without PEFT (``bunny.merge.adapter``) and merged as a
stream (``bunny.merge.stream``). The rest of this module is the path for the adapters that need
PEFT, and for ``--merge-method peft``: the model is loaded once, by ``from_pretrained`` in the
output dtype; the tower and the projector are built straight from their weights (nothing is
randomly initialised only to be overwritten); then PEFT injects, loads, merges and unloads
its LoRA layers. PEFT is imported only then: it takes seconds.
"""

from __future__ import annotations

import contextlib
import copy
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from transformers.utils import logging as hf_logging

from bunny.merge.adapter import (
    PEFT_PREFIX,
    LoraLayer,
    check_adapter_tensors,
    check_saved_adapter,
    key_problems,
    list_keys,
    peft_only_reason,
    read_adapter_config,
    targeted_linears,
)
from bunny.merge.inputs import LoraRun, MergeError
from bunny.merge.stream import TOWER_PREFIX, all_finite
from bunny.model.projector import build_projector
from bunny.model.vision_tower import VisionTower, tower_classes, upgrade_tower_key

PROJECTOR_PREFIX = "model.mm_projector."
_ADAPTER_NAME = re.compile(r"\.default(?=\.|$)")


@dataclass(frozen=True)
class CheckedWeights:
    """The run's weights, checked against the model: keys without the PEFT prefix."""

    non_lora: dict[str, torch.Tensor]
    adapter: dict[str, torch.Tensor]  # keys as saved (PEFT prefix)
    tower_trained: bool
    model_keys: frozenset[str]  # the state-dict keys of the merged model
    tower_unused_missing: tuple[str, ...] = ()  # a trained tower's unused parts the run lacks (older files)
    model_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # the merged model's tensors
    output_names: tuple[str, ...] = ()  # the tensors written, in order: model_keys less the tied aliases
    lora_layers: dict[str, LoraLayer] | None = None  # per adapted linear layer; None: merged through PEFT
    peft_reason: str | None = None  # why the merge needs PEFT, when it does


def model_skeleton(run: LoraRun) -> nn.Module:
    """The merged model's modules on the meta device: names and shapes, no memory."""
    with torch.device("meta"):
        return run.family.causal_lm_class(copy.deepcopy(run.config))


def refuse_non_finite(tensors: dict[str, torch.Tensor], where: Path | str) -> None:
    """A NaN or inf in an input would spread through every merged weight it touches."""
    bad = [name for name, value in tensors.items() if value.is_floating_point() and not all_finite(value)]
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
    problems = key_problems(("keys that are not weights of the model:", [PEFT_PREFIX + k for k in unexpected]),
                            ("shapes that do not fit:", wrong_shape),
                            ("missing keys:", [PEFT_PREFIX + k for k in missing]))
    if problems:
        raise MergeError(f"{run.non_lora_file} does not fit the model of {run.folder / 'config.json'}: " + problems)
    return state, tower_trained, unused_missing


def load_adapter(run: LoraRun) -> dict[str, torch.Tensor]:
    try:
        saved = load_file(run.adapter_weights)
    except (SafetensorError, OSError) as exc:
        raise MergeError(f"{run.adapter_weights} is corrupt or not a safetensors file (unreadable: {exc})") from exc
    refuse_non_finite(saved, run.adapter_weights)
    return saved


def check_adapter_with_peft(run: LoraRun, skeleton: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors must be exactly those PEFT creates for its config on this model.
    Injects (meta) LoRA layers into ``skeleton``."""
    from peft import LoraConfig, inject_adapter_in_model

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
        PEFT_PREFIX + _ADAPTER_NAME.sub("", key): tuple(value.shape)
        for key, value in skeleton.state_dict().items() if "lora_" in key
    }
    # Keys as PEFT saves them, whether or not the file carries the prefix.
    saved = {PEFT_PREFIX + key.removeprefix(PEFT_PREFIX): value for key, value in load_adapter(run).items()}
    check_saved_adapter(saved, expected, lora_config.r, run.adapter_weights, run.adapter_config)
    return saved


def check_weights(run: LoraRun, through_peft: bool = False) -> CheckedWeights:
    """Every check of the run's weights against the model, before anything heavy is loaded.
    ``through_peft``: check (and later merge) the adapter with PEFT whatever it holds."""
    skeleton = model_skeleton(run)
    state = skeleton.state_dict(keep_vars=True)
    model_shapes = {name: tuple(value.shape) for name, value in state.items()}
    seen: set[int] = set()  # a tied weight (embeddings and lm_head) is one tensor under two names
    output_names = tuple(name for name, value in state.items() if not (id(value) in seen or seen.add(id(value))))
    non_lora, tower_trained, unused_missing = check_non_lora(run, skeleton)
    config = read_adapter_config(run.adapter_config)
    reason = "--merge-method peft" if through_peft else peft_only_reason(config)
    layers = None
    if reason is None:
        linears, others = targeted_linears(config, skeleton, run.adapter_config)
        if others:
            reason = f"target_modules match modules that are not linear layers: {list_keys(others)}"
        else:
            adapter = load_adapter(run)
            layers = check_adapter_tensors(config, linears, adapter, run.adapter_weights)
    if reason is not None:
        adapter = check_adapter_with_peft(run, skeleton)
    return CheckedWeights(non_lora, adapter, tower_trained, frozenset(model_shapes), unused_missing, model_shapes,
                          output_names, layers, reason)


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
        raise MergeError(f"--model-base {model_base}: its weights do not fit the model "
                         + key_problems(("missing", missing), ("mismatched", mismatched)))
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


def _check_merged_keys(model: nn.Module, weights: CheckedWeights) -> None:
    keys = set(model.state_dict())
    if keys != weights.model_keys:
        raise RuntimeError(
            "the merged model's weights differ from the model's own layout: "
            f"extra {list_keys(sorted(keys - weights.model_keys))}, "
            f"missing {list_keys(sorted(weights.model_keys - keys))}"
        )


def merge_with_peft(model: nn.Module, run: LoraRun, weights: CheckedWeights) -> nn.Module:
    """PEFT's own merge: LoRA layers injected, loaded, merged and unloaded.

    Adapter tensors narrower than the model (a bf16 adapter on a float32 merge) are widened
    first, so each delta is computed and rounded once, in the output precision."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    lora_config = LoraConfig.from_pretrained(str(run.folder))
    dtype = next(model.parameters()).dtype
    adapter = {
        key: value.to(torch.promote_types(value.dtype, dtype)) if value.is_floating_point() else value
        for key, value in weights.adapter.items()
    }
    with warnings.catch_warnings():  # PEFT calls a transformers method deprecated in v5
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, lora_config, low_cpu_mem_usage=True)
    set_peft_model_state_dict(peft_model, adapter, low_cpu_mem_usage=True)
    left_empty = [name for name, param in peft_model.named_parameters() if param.is_meta]
    if left_empty:
        raise MergeError(f"adapter tensors were not loaded: {list_keys(left_empty)}")
    merged = peft_model.merge_and_unload()
    _check_merged_keys(merged, weights)
    return merged
