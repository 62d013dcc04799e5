"""Tiny local assets for tests and the CPU demo: LLM + tokenizer, vision tower, data splits.

`make_tiny_assets(folder)` builds, in seconds and without a network, everything the recipe
needs in place of Phi-3-mini, SigLIP-so400m and the Bunny datasets. The folder is built under
a temporary name and renamed into place, with a marker file written last that records the
seed and sizes, so a second call with the same arguments returns the existing folder and a
crash never leaves half-made assets behind. Assets of an older format (a demo folder made
before the tiny models or data changed) are rebuilt in place.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bunny.cli import UserError, add_debug_flag, run_cli
from bunny.fsutil import atomic_output_dir
from bunny.tiny.data import TinyDataPaths, check_sizes, write_tiny_datasets

MARKER = "tiny_assets.json"
FORMAT_VERSION = 5  # bump when the models or data change: older assets are rebuilt
LLM_DIR = "llm"
VISION_TOWER_DIR = "vision_tower"
DEFAULT_N_PRETRAIN = 128
DEFAULT_N_FINETUNE = 128
DEFAULT_N_HELDOUT = 96  # enough colour and shape questions (~35) to tell learning from chance

__all__ = ["TinyAssets", "make_tiny_assets", "main"]


@dataclass(frozen=True)
class TinyAssets:
    """Absolute paths of one complete set of tiny assets.

    `recipe1_data` / `recipe2_data` stand in for bunny_695k.json / bunny_llava_1.4m.json;
    both, and `heldout_data`, take their images from `finetune_images`.
    """

    root: Path
    llm: Path
    vision_tower: Path
    pretrain_data: Path
    pretrain_images: Path
    recipe1_data: Path
    recipe2_data: Path
    finetune_images: Path
    heldout_data: Path


def _assets_in(root: Path) -> TinyAssets:
    return TinyAssets(
        root=root,
        llm=root / LLM_DIR,
        vision_tower=root / VISION_TOWER_DIR,
        **asdict(TinyDataPaths.under(root)),
    )


def _file_sizes(root: Path) -> dict[str, int]:
    return {path.relative_to(root).as_posix(): path.stat().st_size
            for path in sorted(root.rglob("*")) if path.is_file() and path.name != MARKER}


def _why_not_reusable(root: Path, spec: dict[str, Any]) -> str | None:
    """Why `root` cannot be reused for `spec` (None when its marker records `spec` and every file is intact)."""
    try:
        marker = json.loads((root / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"it has no readable {MARKER}"
    if not isinstance(marker, dict) or not isinstance(marker.get("files"), dict):
        return f"its {MARKER} is malformed"
    if marker.get("spec") != spec:
        return f"its {MARKER} records {marker.get('spec')}, not {spec}"
    for relative, size in marker["files"].items():
        path = root / relative
        if not path.is_file() or path.stat().st_size != size:
            return f"its file {relative} is missing or changed size"
    return None


def _is_older_format(root: Path) -> bool:
    """Whether `root` holds tiny assets that an earlier FORMAT_VERSION built."""
    try:
        spec = json.loads((root / MARKER).read_text(encoding="utf-8"))["spec"]
        return int(spec["format"]) < FORMAT_VERSION
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _build(root: Path, spec: dict[str, Any]) -> None:
    from bunny.tiny.models import save_tiny_llm, save_tiny_vision_tower  # torch: not for --help
    from bunny.tiny.pretraining import LLM_PRETRAIN_STEPS

    pretrained = bool(spec["pretrained"])
    save_tiny_llm(root / LLM_DIR, spec["seed"], pretrain_steps=LLM_PRETRAIN_STEPS if pretrained else 0)
    save_tiny_vision_tower(root / VISION_TOWER_DIR, spec["seed"], patch_features=pretrained)
    write_tiny_datasets(root, spec["seed"], spec["n_pretrain"], spec["n_finetune"], spec["n_heldout"])
    marker: dict[str, Any] = {"spec": spec, "files": _file_sizes(root)}
    (root / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def make_tiny_assets(
    folder: str | Path,
    seed: int = 0,
    n_pretrain: int = DEFAULT_N_PRETRAIN,
    n_finetune: int = DEFAULT_N_FINETUNE,
    n_heldout: int = DEFAULT_N_HELDOUT,
    force: bool = False,
    pretrained: bool = False,
) -> TinyAssets:
    """Build (or reuse) tiny assets in `folder`; the same seed gives the same bytes.

    `pretrained` gives the LLM and the vision tower what real checkpoints start from
    (`bunny.tiny.pretraining`: about a minute of text pre-training, colour- and
    position-carrying patch features), so that the demo's short training learns visibly;
    without it both are random, which is enough to exercise the code and builds in a second.

    Reuses `folder` when its marker records the same seed and sizes, and rebuilds it when
    the marker records an older format. Refuses a non-empty `folder` that holds anything
    else, unless `force`, which replaces it atomically.
    """
    check_sizes(n_pretrain, n_finetune, n_heldout)
    root = Path(folder).absolute()
    spec = {"format": FORMAT_VERSION, "seed": seed, "n_pretrain": n_pretrain,
            "n_finetune": n_finetune, "n_heldout": n_heldout, "pretrained": pretrained}
    if not force:
        if root.exists() and not root.is_dir():
            raise FileExistsError(f"{root} exists and is not a folder")
        if root.is_dir() and any(root.iterdir()):
            reason = _why_not_reusable(root, spec)
            if reason is None:
                return _assets_in(root)
            if not _is_older_format(root):
                raise FileExistsError(f"{root} holds something other than these tiny assets: {reason}; "
                                      "pass force=True (--force) to replace it")
    try:
        with atomic_output_dir(root, overwrite=force or root.exists()) as temp:
            _build(temp, spec)
    except FileExistsError:  # another process built the folder meanwhile: fine if it built the same
        if _why_not_reusable(root, spec) is not None:
            raise
    return _assets_in(root)


def main(argv: list[str] | None = None) -> int:
    """`bunny-tiny OUT_DIR [--seed N] [--force]`: build tiny assets and print their paths."""
    parser = argparse.ArgumentParser(prog="bunny-tiny", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="folder to build the assets in")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-pretrain", type=int, default=DEFAULT_N_PRETRAIN)
    parser.add_argument("--n-finetune", type=int, default=DEFAULT_N_FINETUNE, help="records per recipe")
    parser.add_argument("--n-heldout", type=int, default=DEFAULT_N_HELDOUT)
    parser.add_argument("--force", action="store_true", help="replace whatever the folder holds")
    parser.add_argument("--pretrained", action="store_true",
                        help="pre-train the LLM and set the tower's patch features (the demo's assets)")
    parser.add_argument("--json", action="store_true", help="print the paths as one JSON object")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    return run_cli("bunny-tiny", lambda: _build_and_print(args), debug=args.debug)


def _build_and_print(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    try:
        assets = make_tiny_assets(args.out_dir, seed=args.seed, n_pretrain=args.n_pretrain,
                                  n_finetune=args.n_finetune, n_heldout=args.n_heldout, force=args.force,
                                  pretrained=args.pretrained)
    except (FileExistsError, ValueError) as error:  # a folder in the way, sizes out of range
        raise UserError(str(error)) from error
    paths = {name: str(path) for name, path in asdict(assets).items()}
    if args.json:
        print(json.dumps(paths, indent=2))
    else:
        for name, path in paths.items():
            print(f"{name}: {path}")
        print(f"# ready in {time.perf_counter() - started:.1f} s")
    return 0
