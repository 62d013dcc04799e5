"""A LoRA adapter read without PEFT: its config's targets, checked against the model, and the
``(lora_A, lora_B, scale)`` of every layer it adapts.

PEFT takes seconds to import and builds LoRA modules only to fold them away again. For the
adapters Bunny's trainer writes (plain LoRA on ``nn.Linear`` layers: ``target_modules`` a
regex or a list of names, one rank and alpha) the merge needs nothing of it: which layers
are targeted follows PEFT's own rule (``peft.tuners.tuners_utils.check_target_module_exists``:
a string is a full-match regex over module names, a list matches a name or a name's last
dotted parts), and each merged weight is ``W + scale * B @ A`` with ``scale = lora_alpha / r``
(``/ sqrt(r)`` with rsLoRA). An adapter that uses anything else, any field this module does
not know set to a non-default value included, is reported by :func:`peft_only_reason`, and
the merge goes through PEFT for it rather than risk a wrong result.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bunny.merge.inputs import MergeError

PEFT_PREFIX = "base_model.model."
MAX_LISTED_KEYS = 10

# Fields that do not change the merged weights (bookkeeping, initialisation, training-time
# dropout). fan_in_fan_out too: PEFT switches it off for nn.Linear targets, the only ones
# merged here.
_NO_EFFECT = frozenset({
    "auto_mapping", "base_model_name_or_path", "revision", "task_type", "inference_mode", "peft_version",
    "init_lora_weights", "lora_dropout", "loftq_config", "eva_config", "corda_config", "megatron_config",
    "megatron_core", "runtime_config", "fan_in_fan_out", "qalora_group_size", "ensure_weight_tying",
    "peft_type", "target_modules", "r", "lora_alpha", "use_rslora",
})


def list_keys(keys) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:MAX_LISTED_KEYS])
    hidden = len(keys) - MAX_LISTED_KEYS
    return shown + (f" ... and {hidden} more" if hidden > 0 else "")


def key_problems(*labelled: tuple[str, list[str]]) -> str:
    """`label keys; label keys` for each (label, keys) whose keys are not empty ("" if none is)."""
    return "; ".join(f"{label} {list_keys(keys)}" for label, keys in labelled if keys)


def read_adapter_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MergeError(f"unreadable {path}: {exc}") from exc
    if not isinstance(config, dict):
        raise MergeError(f"unreadable {path}: not a JSON object")
    return config


def peft_only_reason(config: dict) -> str | None:
    """Why this adapter's merge needs PEFT (a feature not merged here), or None."""
    for name, value in config.items():
        if name not in _NO_EFFECT and value not in (None, False, {}, [], "", "none"):
            return f"{name}={value!r}"
    targets = config.get("target_modules")
    if not (isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        return f"target_modules={targets!r}"
    if targets == "all-linear":
        return "target_modules='all-linear'"
    if not isinstance(config.get("r"), int) or not isinstance(config.get("lora_alpha"), (int, float)):
        return f"r={config.get('r')!r}, lora_alpha={config.get('lora_alpha')!r}"
    return None


def is_target(targets: str | list[str], name: str) -> bool:
    """PEFT's rule for one module name (no exclusions, no layer filters: see peft_only_reason)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return name in targets or any(name.endswith(f".{target}") for target in targets)


@dataclass(frozen=True)
class LoraLayer:
    """One adapted linear layer: ``weight + scale * up @ down``."""

    down: torch.Tensor  # lora_A.weight [r, in]
    up: torch.Tensor  # lora_B.weight [out, r]
    scale: float


def targeted_linears(config: dict, skeleton: nn.Module, where: Path) -> tuple[dict[str, nn.Linear], list[str]]:
    """The linear layers of ``skeleton`` the adapter targets, and the targeted modules that are
    not linear layers (PEFT would wrap or refuse them: the caller falls back to PEFT)."""
    targets = config["target_modules"]
    linears, others = {}, []
    for name, module in skeleton.named_modules():
        if name and is_target(targets, name):
            if type(module) is nn.Linear:
                linears[name] = module
            else:
                others.append(name)
    if not linears and not others:
        raise MergeError(f"{where}: target_modules {targets!r} do not fit the model: no module of it matches")
    return linears, others


def check_saved_adapter(
    saved: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], r: int, weights_file: Path, config_file: Path
) -> None:
    """``saved`` holds exactly the ``expected`` tensors (key -> shape), or a MergeError names
    the keys that fit no LoRA layer, the missing ones and the wrong shapes."""
    unexpected = [key for key in saved if key not in expected]
    missing = [key for key in expected if key not in saved]
    wrong_shape = [
        f"{key}: file {tuple(value.shape)} vs adapter config {tuple(expected[key])}"
        for key, value in saved.items()
        if key in expected and tuple(value.shape) != tuple(expected[key])
    ]
    problems = key_problems(("keys that fit no LoRA layer of the model:", unexpected), ("missing keys:", missing),
                            (f"shapes that do not fit (r={r}):", wrong_shape))
    if problems:
        raise MergeError(f"{weights_file} does not fit the model and {config_file}: " + problems)


def check_adapter_tensors(
    config: dict, linears: dict[str, nn.Linear], adapter: dict[str, torch.Tensor], weights_file: Path
) -> dict[str, LoraLayer]:
    """Exactly the tensors PEFT saves for these layers (``base_model.model.<layer>.lora_A.weight``
    [r, in] and ``.lora_B.weight`` [out, r]), or a MergeError naming the others."""
    r = config["r"]
    expected = {}
    for name, linear in linears.items():
        expected[f"{PEFT_PREFIX}{name}.lora_A.weight"] = (r, linear.in_features)
        expected[f"{PEFT_PREFIX}{name}.lora_B.weight"] = (linear.out_features, r)
    check_saved_adapter(adapter, expected, r, weights_file, weights_file.with_name("adapter_config.json"))
    scale = config["lora_alpha"] / (math.sqrt(r) if config.get("use_rslora") else r)
    return {
        name: LoraLayer(adapter[f"{PEFT_PREFIX}{name}.lora_A.weight"], adapter[f"{PEFT_PREFIX}{name}.lora_B.weight"], scale)
        for name in linears
    }
