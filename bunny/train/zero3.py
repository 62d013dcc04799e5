"""ZeRO-3 fetches parameters per transformer layer, not per ``nn.Linear``.

By default ZeRO-3 puts fetch/release hooks on every module that holds parameters. A LoRA
decoder layer of Phi-3 is some 25 such modules (each adapted linear is a base layer, a dropout,
``lora_A`` and ``lora_B``), and the hooks' Python runs for each of them in the forward, the
recomputed forward of gradient checkpointing and the backward: at Bunny-4B's depth that is
more host time per step than the GPU needs for the step. Marked as a ZeRO-3 *leaf*, a layer is
fetched whole when it is entered and released when it is left (one layer is ~0.2 GB in bf16);
the arithmetic, and so the loss, is unchanged. ``python -m bunny.bench.host_overhead``
measures the hook cost on the CPU.
"""

from __future__ import annotations

import logging

from torch import nn
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.modeling_layers import GradientCheckpointingLayer

logger = logging.getLogger(__name__)


def transformer_layer_classes(model: nn.Module) -> list[type]:
    """The classes of the model's repeated transformer layers (LLM decoder layers, vision
    encoder layers): the modules transformers can checkpoint one by one."""
    classes = {type(module) for module in model.modules() if isinstance(module, GradientCheckpointingLayer)}
    return sorted(classes, key=lambda cls: cls.__name__)


def fetch_whole_layers_under_zero3(model: nn.Module) -> list[str]:
    """Under ZeRO-3, mark every transformer layer of ``model`` as a leaf module (before
    ``deepspeed.initialize``, which places the hooks). Returns the marked class names; does
    nothing (and returns ``[]``) without ZeRO-3."""
    if not is_deepspeed_zero3_enabled():
        return []
    classes = transformer_layer_classes(model)
    if not classes:
        return []
    from deepspeed.utils import set_z3_leaf_modules

    set_z3_leaf_modules(model, classes)
    names = [cls.__name__ for cls in classes]
    logger.info("ZeRO-3: parameters fetched per layer for %s", ", ".join(names))
    return names
