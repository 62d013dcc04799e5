"""Checks a data file before training, so a bad record fails in seconds, not hours in.

Every problem is collected (not just the first) and names the file, the record's id and its
index. The rules:

* a record is a JSON object with an ``id`` and a non-empty ``conversations`` list of
  ``{"from": "human"|"gpt", "value": str}`` turns that alternate human, gpt, starting with
  human and ending with a gpt answer (a trailing question would train nothing);
* ``plain`` (pretraining) records have exactly one human and one gpt turn;
* one image per record at most: a record with an ``image`` has exactly one ``<image>``, in its
  first human turn (the templates move it to the start of that turn); a record without
  ``image`` has none (a stray placeholder would become an image slot with no image);
* ``image`` is a path relative to ``--image_folder`` that stays inside it (no absolute paths,
  no ``..`` escaping it, checked on the text of the path); with ``check_images`` the file must
  exist and decode completely, through the very `load_image` training uses, to 8-bit RGB (each
  distinct file once, in a thread pool: PIL's decoders release the GIL). PIL's ``verify()``
  would not do: it checks nothing of a JPEG's image data, so a truncated JPEG would pass and
  fail training at the first batch that reads it;
* no turn is empty: an empty (or blank) answer would train the end-of-text token alone, and an
  empty question (no text and no ``<image>``) would ask nothing. Such records are refused, not
  skipped: they are a data-preparation bug to fix, and a skip would hide it.

A *validation record* lets a training stage skip decoding images that preflight has just
decoded: `write_validation_record` stores what the images were checked against (the data
file's SHA-256, the image folder, and the (path, size, mtime_ns, ctime_ns, inode) of every
referenced image), and `validate_dataset(..., validation_record=path)` decodes no image when
that still matches: a hash of the data file and one `stat` per image, instead of a full
decode. The data file's hash fixes the set of image paths; an image rewritten in place
changes its mtime and its ctime (which no user can set back: `touch -r` and `os.utime` set
the mtime only), a replaced one its inode. On any mismatch, a missing or unreadable record,
every image is decoded as without one. Records are always checked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bunny.cli import UserError
from bunny.fsutil import write_json_atomic
from bunny.constants import DEFAULT_IMAGE_TOKEN
from bunny.conversation import GPT, HUMAN, get_template
from bunny.data.images import load_image
from bunny.data.records import Record, json_kind, load_records

logger = logging.getLogger(__name__)

MAX_LISTED_PROBLEMS = 50
VALIDATION_RECORD_ENV = "BUNNY_VALIDATION_RECORD"  # the flow passes the record's path to train.py in it
VALIDATION_RECORD_FORMAT = 1  # bump when what a record vouches for changes (e.g. the image decoder)
HASH_BLOCK = 1 << 20
IMAGE_CHUNK = 1024  # images checked between two progress reports
RECORD_CHUNK = 65536  # records checked between two progress reports
THREADS_FROM = 64  # fewer distinct images than this are checked in the calling thread

_WINDOWS_DRIVE = re.compile(r"[A-Za-z]:[\\/]")
Progress = Callable[[int, int], None]  # (checks done, checks known so far)


@dataclass(frozen=True)
class DataProblem:
    """One thing wrong with one record of a data file."""

    data_path: str
    index: int
    record_id: str | None  # None when the record has no id
    message: str

    def __str__(self) -> str:
        if self.record_id is None:
            return f"{self.data_path}: record #{self.index} (no id): {self.message}"
        return f"{self.data_path}: record {self.record_id!r} (#{self.index}): {self.message}"


class DataValidationError(ValueError):
    """Raised by `validate_dataset`; `problems` holds every problem found."""

    def __init__(self, data_path: str, problems: Sequence[DataProblem]) -> None:
        self.data_path = data_path
        self.problems = list(problems)
        listed = "\n".join(f"  {problem}" for problem in self.problems[:MAX_LISTED_PROBLEMS])
        hidden = len(self.problems) - MAX_LISTED_PROBLEMS
        more = f"\n  ... and {hidden} more problems" if hidden > 0 else ""
        super().__init__(f"{self.headline}:\n{listed}{more}")

    @property
    def headline(self) -> str:
        return f"{len(self.problems)} problem{'' if len(self.problems) == 1 else 's'} in --data_path {self.data_path}"

    def as_user_error(self) -> UserError:
        """The same report for `bunny.cli.run_cli`: the headline, then one line per problem
        (the first MAX_LISTED_PROBLEMS, and how many more)."""
        listed = [str(problem) for problem in self.problems[:MAX_LISTED_PROBLEMS]]
        if len(self.problems) > MAX_LISTED_PROBLEMS:
            listed.append(f"... and {len(self.problems) - MAX_LISTED_PROBLEMS} more problems")
        return UserError(self.headline, listed)


def _turn_problems(conversations: Any, template_name: str) -> list[str]:
    if not isinstance(conversations, list) or not conversations:
        return ["'conversations' must be a non-empty list of turns"]
    problems: list[str] = []
    order_reported = False
    for index, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            problems.append(f"turn {index} must be an object with a 'from' and a string 'value'")
            continue
        role, expected = turn.get("from"), HUMAN if index % 2 == 0 else GPT
        if not turn["value"].strip():
            kind = "answer" if role == GPT else "question" if role == HUMAN else "turn"
            problems.append(f"turn {index} ({role!r}) is an empty {kind}: "
                            + ("it would train only the end-of-text token" if role == GPT else "it asks nothing"))
        if role not in (HUMAN, GPT):
            problems.append(f"turn {index} has unknown role {role!r} (expected 'human' or 'gpt')")
        elif role != expected and not order_reported:
            problems.append(f"turn {index} is from {role!r}, expected {expected!r} "
                            "(turns alternate human, gpt, starting with human)")
            order_reported = True
    if len(conversations) % 2 and not order_reported:
        problems.append("the last turn is a human turn with no gpt answer")
    if template_name == "plain" and len(conversations) != 2:
        problems.append("the plain template takes one human and one gpt turn, "
                        f"this record has {len(conversations)} turns")
    return problems


def _placeholder_problems(conversations: list[Any], has_image: bool) -> list[str]:
    counts = [turn["value"].count(DEFAULT_IMAGE_TOKEN) if isinstance(turn, dict) and isinstance(turn.get("value"), str)
              else 0 for turn in conversations]
    total = sum(counts)
    if total > 1:
        return [f"holds {total} {DEFAULT_IMAGE_TOKEN} placeholders; a record has one image at most"]
    if has_image and total == 0:
        return [f"has an 'image' but no {DEFAULT_IMAGE_TOKEN} in its first human turn"]
    if has_image and counts[0] != 1:
        return [f"its {DEFAULT_IMAGE_TOKEN} is in turn {counts.index(1)}; it must be in the first human turn"]
    if not has_image and total:
        return [f"holds {DEFAULT_IMAGE_TOKEN} but has no 'image' field"]
    return []


def _image_path_problem(image: Any, image_folder: Path | None) -> str | None:
    """Why `image` is not a usable path inside `image_folder`, judged on its text alone."""
    if not isinstance(image, str) or not image:
        return f"'image' must be a non-empty relative path, got {image!r}"
    if image_folder is None:
        return f"has image {image!r} but no --image_folder was given"
    if image.startswith(("/", "\\")) or _WINDOWS_DRIVE.match(image):
        return f"image path {image!r} is absolute; it must be relative to --image_folder {image_folder}"
    if ".." in image:
        normalized = posixpath.normpath(image.replace("\\", "/"))
        if normalized == ".." or normalized.startswith("../"):
            return f"image path {image!r} escapes --image_folder {image_folder}"
    return None


def _record_problems(record: Any, template_name: str, image_folder: Path | None) -> tuple[list[str], bool]:
    """Problems of one record that need no file access, and whether its image path is usable."""
    if not isinstance(record, dict):
        return [f"must be a JSON object, got a JSON {json_kind(record)}"], False
    problems = [] if record.get("id") is not None else ["has no 'id'"]
    has_image = "image" in record
    path_problem = _image_path_problem(record["image"], image_folder) if has_image else None
    if path_problem is not None:
        problems.append(path_problem)
    conversations = record.get("conversations")
    if conversations is None:
        problems.append("has no 'conversations'")
    else:
        problems += _turn_problems(conversations, template_name)
        if isinstance(conversations, list) and conversations:
            problems += _placeholder_problems(conversations, has_image)
    return problems, has_image and path_problem is None


def _image_file_problem(path: Path) -> str | None:
    """Why `path` is not an image training can use, or None when it decodes completely."""
    if not path.is_file():
        return f"image file {path} not found"
    try:
        load_image(path)
    except Exception as exc:  # load_image names the file; PIL may raise anything for broken files
        cause = exc.__cause__ or exc
        return f"image file {path} cannot be read ({type(cause).__name__}: {cause})"
    return None


def validate_records(
    records: Sequence[Record],
    data_path: str | Path,
    image_folder: str | Path | None,
    template_name: str,
    check_images: bool = True,
    workers: int = 8,
    progress: Progress | None = None,
) -> list[DataProblem]:
    """Every problem of `records` (read from `data_path`), in record order per check.

    `check_images=False` skips opening image files (paths are still checked as text).
    `progress(done, total)` is called now and then: first over the records (total = records),
    then over the distinct image files (total = records + images).
    """
    get_template(template_name)
    source = str(data_path)
    folder = Path(image_folder) if image_folder is not None else None
    problems: list[DataProblem] = []
    users_of_image: dict[Path, list[int]] = {}

    def report(index: int, message: str) -> None:
        record = records[index]
        rid = str(record["id"]) if isinstance(record, dict) and record.get("id") is not None else None
        problems.append(DataProblem(source, index, rid, message))

    for index, record in enumerate(records):
        messages, image_usable = _record_problems(record, template_name, folder)
        for message in messages:
            report(index, message)
        if check_images and image_usable:
            users_of_image.setdefault(folder / record["image"], []).append(index)  # type: ignore[operator]
        if progress is not None and (index + 1) % RECORD_CHUNK == 0:
            progress(index + 1, len(records))

    total = len(records) + len(users_of_image)
    if progress is not None:
        progress(len(records), total)
    paths = list(users_of_image)
    done = len(records)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, len(paths), IMAGE_CHUNK):
            chunk = paths[start:start + IMAGE_CHUNK]
            threaded = len(paths) >= THREADS_FROM and workers > 1
            results = pool.map(_image_file_problem, chunk) if threaded else map(_image_file_problem, chunk)
            for path, message in zip(chunk, results):
                if message is not None:
                    for index in users_of_image[path]:
                        report(index, message)
            done += len(chunk)
            if progress is not None:
                progress(done, total)
    problems.sort(key=lambda problem: problem.index)
    return problems


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def images_fingerprint(records: Sequence[Record], image_folder: str | Path) -> str | None:
    """SHA-256 over the sorted (relative path, size, mtime_ns, ctime_ns, inode) of every distinct
    image the records reference; None when one cannot be stat'ed (it would not validate)."""
    folder = Path(image_folder)
    names = sorted({record["image"] for record in records
                    if isinstance(record, dict) and "image" in record
                    and _image_path_problem(record["image"], folder) is None})
    digest = hashlib.sha256()
    for name in names:
        try:
            stat = os.stat(folder / name)
        except OSError:
            return None
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\0{stat.st_ctime_ns}\0{stat.st_ino}\n".encode())
    return digest.hexdigest()


def _record_content(data_path: str | Path, image_folder: str | Path, records: Sequence[Record],
                    data_sha256: str) -> dict[str, Any] | None:
    fingerprint = images_fingerprint(records, image_folder)
    if fingerprint is None:
        return None
    return {
        "format": VALIDATION_RECORD_FORMAT,
        "data_path": str(Path(data_path).resolve()),
        "data_sha256": data_sha256,
        "image_folder": str(Path(image_folder).resolve()),
        "images_sha256": fingerprint,
    }


def validation_record_content(data_path: str | Path, image_folder: str | Path,
                              records: Sequence[Record]) -> dict[str, Any] | None:
    """What a record vouches for, taken now: call it BEFORE decoding the images, so that an
    image changed during the check makes the record stale rather than wrong."""
    return _record_content(data_path, image_folder, records, file_sha256(data_path))


def validation_record_path(root: str | Path, data_path: str | Path, image_folder: str | Path) -> Path:
    """Where the flow keeps the record of one (data file, image folder) pair under `root`."""
    key = f"{Path(data_path).resolve()}\0{Path(image_folder).resolve()}".encode()
    return Path(root) / ".validation" / f"{hashlib.sha256(key).hexdigest()[:16]}.json"


def write_validation_record(path: str | Path, content: dict[str, Any]) -> None:
    write_json_atomic(path, content)


def validation_record_mismatch(record_path: str | Path, data_path: str | Path,
                               image_folder: str | Path | None, records: Sequence[Record]) -> str | None:
    """Why the record at `record_path` does not vouch for these images now; None when it does."""
    try:
        stored = json.loads(Path(record_path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"validation record {record_path} unreadable ({type(exc).__name__}: {exc})"
    if image_folder is None:
        return "no --image_folder"
    if not isinstance(stored, dict) or stored.get("format") != VALIDATION_RECORD_FORMAT:
        return f"validation record {record_path} is not of format {VALIDATION_RECORD_FORMAT}"
    if stored.get("data_path") != str(Path(data_path).resolve()):
        return f"validation record {record_path} is for data file {stored.get('data_path')}, not {data_path}"
    if stored.get("image_folder") != str(Path(image_folder).resolve()):
        return f"validation record {record_path} is for image folder {stored.get('image_folder')}, not {image_folder}"
    if stored.get("data_sha256") != file_sha256(data_path):
        return f"data file {data_path} changed since validation record {record_path}"
    now = _record_content(data_path, image_folder, records, stored["data_sha256"])
    if now is None or now["images_sha256"] != stored.get("images_sha256"):
        return f"images under {image_folder} changed since validation record {record_path}"
    return None


def validate_dataset(
    data_path: str | Path,
    image_folder: str | Path | None,
    template_name: str,
    check_images: bool = True,
    workers: int = 8,
    progress: Progress | None = None,
    validation_record: str | Path | None = None,
) -> list[Record]:
    """Load and check `data_path`; return its records, or raise `DataValidationError` listing all problems.

    With a `validation_record` that still matches (see `validation_record_mismatch`) no image
    is decoded; any mismatch is logged and every image is checked.
    A missing or unparsable file raises `load_records`' FileNotFoundError / ValueError.
    """
    records = load_records(data_path)
    if check_images and validation_record:
        why = validation_record_mismatch(validation_record, data_path, image_folder, records)
        if why is None:
            logger.info("images of %s unchanged since validation record %s: not decoded again",
                        data_path, validation_record)
            check_images = False
        else:
            logger.warning("%s: checking every image", why)
    problems = validate_records(records, data_path, image_folder, template_name, check_images, workers, progress)
    if problems:
        raise DataValidationError(str(data_path), problems)
    return records
