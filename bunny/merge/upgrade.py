"""``python -m bunny.merge.upgrade OLD NEW``: a model folder this project wrote before it
adopted the original Bunny's tower layout, rewritten in that layout (once, per folder).

Earlier merged and averaged folders named the tower's tensors ``model.vision_tower.
vision_tower.<name>`` (no ``vision_model.``) and held only the layers up to the feature
layer. The upgrade renames them and adds the parts after the feature layer (the later
layers, the post-layernorm, the head) from the base tower's folder, unchanged, as the
original's files hold them. Every other tensor and file is copied as it is. The output is
written atomically, like a merge.

LoRA runs need no upgrade: ``python -m bunny.merge`` reads their earlier
``non_lora_trainables.bin`` as it is (see ``bunny.model.vision_tower.upgrade_tower_key``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from safetensors.torch import load_file

from bunny.average import DEFAULT_MAX_SHARD_SIZE, copy_non_weight_files, parse_size, read_checkpoint
from bunny.cli import add_debug_flag, run_cli
from bunny.fsutil import atomic_output_dir
from bunny.merge.inputs import CONFIG_FILE, MergeError, check_output_path
from bunny.merge.shards import write_sharded
from bunny.model.vision_tower import read_vision_config, tower_classes, upgrade_tower_key

TOWER_KEY_PREFIX = "model.vision_tower.vision_tower.vision_model."


def base_tower_tensors(folder: Path) -> dict:
    """The base tower's tensors, named as a Bunny model names them."""
    config = read_vision_config(folder)
    encoder = tower_classes(config.model_type)[1].from_pretrained(str(folder), config=config)
    return {TOWER_KEY_PREFIX + name: tensor for name, tensor in encoder.state_dict().items()}


def upgrade_model_folder(old: str | Path, new: str | Path, vision_tower: str | Path | None = None) -> list[str]:
    """Write ``old`` to ``new`` in the original's tower layout; returns the tower tensors
    added from the base tower. ``vision_tower``: the base tower's folder, when the config's
    ``mm_vision_tower`` is not one."""
    old = Path(old)
    if not (old / CONFIG_FILE).is_file():
        raise MergeError(f"{old}: no {CONFIG_FILE} there (expected a merged or averaged model folder)")
    output = check_output_path(new, [old], overwrite=False)
    checkpoint = read_checkpoint(old)
    state = {}
    for shard in sorted({entry.file for entry in checkpoint.tensors.values()}):
        state.update({upgrade_tower_key(name): tensor for name, tensor in load_file(shard).items()})
    recorded = json.loads((old / CONFIG_FILE).read_text()).get("mm_vision_tower")
    tower = Path(vision_tower) if vision_tower is not None else Path(recorded) if recorded else None
    if tower is None or not tower.is_dir():
        source = "--vision-tower" if vision_tower is not None else f"mm_vision_tower in {old / CONFIG_FILE}"
        raise MergeError(f"{source} {str(tower)!r} is not a local folder: pass --vision-tower with the base tower's folder")
    tower_dtype = next(t.dtype for name, t in state.items() if name.startswith(TOWER_KEY_PREFIX))
    base = base_tower_tensors(tower)
    added = [name for name in base if name not in state]
    state.update({name: base[name].to(tower_dtype) for name in added})
    with atomic_output_dir(output) as temp:
        write_sharded(state, temp, parse_size(DEFAULT_MAX_SHARD_SIZE))
        copy_non_weight_files(checkpoint, temp)
    return added


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bunny-upgrade", description=__doc__.split("\n\n")[0])
    parser.add_argument("old", help="a model folder written by an earlier version of this project")
    parser.add_argument("new", help="the upgraded folder (must not exist)")
    parser.add_argument("--vision-tower", help="the base tower's folder, when mm_vision_tower is not one")
    add_debug_flag(parser)
    args = parser.parse_args(argv)

    def body() -> int:
        added = upgrade_model_folder(args.old, args.new, args.vision_tower)
        print(f"wrote {args.new}: tower tensors renamed, {len(added)} added from the base tower")
        return 0

    return run_cli("bunny-upgrade", body, debug=args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
