"""Config files that transformers 4, the original Bunny's, reads as this project meant them.

transformers 5 writes the RoPE settings as ``rope_parameters`` and the dtype as ``dtype``;
transformers 4 knows neither and would fall back to its defaults silently (``rope_theta``
10000, no RoPE scaling: wrong for Llama-3's 500000 or Phi-3-128k's longrope). Configs written
here also carry the old names. transformers 5 reads them back as the same settings.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import PretrainedConfig

CONFIG_FILE = "config.json"
_NOT_SCALING_FIELDS = ("rope_theta", "rope_type", "partial_rotary_factor")


def transformers4_fields(config: dict) -> dict:
    """The transformers-4 names of ``config``'s settings that it holds only under new names."""
    fields = {}
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        fields["rope_theta"] = rope["rope_theta"]
        rope_type = rope.get("rope_type", "default")
        scaling = {k: v for k, v in rope.items() if k not in _NOT_SCALING_FIELDS}
        fields["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, "rope_type": rope_type, **scaling}
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            fields["partial_rotary_factor"] = rope["partial_rotary_factor"]
    if config.get("dtype") is not None:
        fields["torch_dtype"] = config["dtype"]
    return {key: value for key, value in fields.items() if key not in config}


def save_config(config: PretrainedConfig, folder: str | Path) -> None:
    """``config.save_pretrained(folder)``, plus the fields transformers 4 reads."""
    config.save_pretrained(folder)
    path = Path(folder) / CONFIG_FILE
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(transformers4_fields(data))
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
