"""``train.py --help`` in a fraction of a second: the text is cached after its first print.

The flags are transformers' ``TrainingArguments`` plus ours, parsed by ``HfArgumentParser``:
printing them imports torch and transformers (seconds). The text depends only on the sources
of our argument dataclasses, the transformers version and the terminal width, so it is cached
under a key made of exactly these; any change makes a new key (and one slow print).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import sys
from importlib.metadata import version
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]
# Our sources whose contents reach the help text (arguments.py and what it takes help/choices from).
HELP_SOURCES = ("train/arguments.py", "train/ds_config.py", "model/builder.py", "model/projector.py", "conversation.py")


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bunny"


def help_key() -> str:
    digest = hashlib.sha256()
    for name in HELP_SOURCES:
        digest.update(name.encode() + b"\0" + (PACKAGE / name).read_bytes() + b"\0")
    digest.update(f"{version('transformers')}\0{sys.version}\0{shutil.get_terminal_size().columns}".encode())
    return digest.hexdigest()[:20]


def render_help(argv: list[str]) -> str:
    """What ``parse_args(argv)`` prints for ``--help`` (imports torch and transformers)."""
    from bunny.train.arguments import parse_args

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        parse_args(argv)
    return out.getvalue()


def print_help(argv: list[str]) -> None:
    """Print the help text, from the cache when it holds this key's text."""
    from bunny.fsutil import write_text_atomic

    path = cache_dir() / f"train-help-{help_key()}.txt"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        text = render_help(argv)
        with contextlib.suppress(OSError):  # a read-only home still gets its help, uncached
            write_text_atomic(path, text)
    sys.stdout.write(text)
