"""DeepSpeed's CPU communication op, built once per Python environment, announced.

On the CPU path every deepspeed launch loads DeepSpeed's `shm_comm` op, which it compiles on
first use (about a minute, silently) into torch's extension cache — by default one folder
under `$HOME` shared by every virtualenv with the same Python, so environments with another
torch rebuild it in turn. DeepSpeed offers no switch to skip it. So the flow gives each
environment its own cache (`TORCH_EXTENSIONS_DIR`, unless the user set one; the stages inherit
it) and, when the op is not built there yet, builds it before the first stage, saying so.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

SHM_OP = "deepspeed_shm_comm"


def environment_extensions_dir() -> Path:
    """A torch extension cache of this environment: keyed by its prefix and torch version."""
    import torch

    tag = hashlib.sha256(f"{sys.prefix}\0{torch.__version__}".encode()).hexdigest()[:12]
    return Path.home() / ".cache" / "bunny" / "torch_extensions" / f"py{sys.version_info[0]}{sys.version_info[1]}-{tag}"


def extensions_dir() -> Path:
    """Where the stages' deepspeed builds and finds its ops (set for them if unset)."""
    if not os.environ.get("TORCH_EXTENSIONS_DIR"):
        os.environ["TORCH_EXTENSIONS_DIR"] = str(environment_extensions_dir())
    return Path(os.environ["TORCH_EXTENSIONS_DIR"])


def shm_op_built(root: Path) -> bool:
    return (root / SHM_OP / f"{SHM_OP}.so").is_file()


def ensure_cpu_comm_op(say: Callable[[str], None]) -> bool:
    """Build the op into this environment's cache unless it is there; True if it was built."""
    root = extensions_dir()
    if shm_op_built(root):
        return False
    say(f"building DeepSpeed's CPU communication op once for this environment (about a minute) into {root}")
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:  # not a CPU accelerator: nothing to build
        return False
    builder.load(verbose=False)
    return True
