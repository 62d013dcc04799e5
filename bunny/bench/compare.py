"""Our stages against the clean-loop ceiling measured on the same device.

    python -m bunny.bench.compare CLEAN.jsonl BUNNY.jsonl [--json-out SUMMARY.json]

``CLEAN.jsonl`` is the output of the reference ``clean_loop.py`` (any number of runs, e.g. with
and without ``--no-ckpt``; non-JSON lines are ignored), ``BUNNY.jsonl`` that of
``bunny.bench.throughput``. A stage is compared with the clean-loop line of the same setting,
checkpointing and micro-batch; a stage with an unfrozen vision tower has no clean-loop
counterpart (the clean loop never trains the tower) and gets no ratio. Each fast-profile stage
is also divided by its tutorial-settings stage: the fast profile's gain.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_json_lines(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _ceiling_for(row: dict, clean: list[dict]) -> dict | None:
    if row.get("unfreeze_vision_tower"):
        return None
    for candidate in clean:
        if (candidate.get("setting"), candidate.get("ckpt"), candidate.get("batch")) == (
            row["setting"], row["ckpt"], row["batch"]
        ):
            return candidate
    return None


def compare(clean: list[dict], ours: list[dict]) -> list[dict]:
    """One row per measured stage of ours: its figures, the ceiling's, and the ratios."""
    measured = {row["stage"]: row for row in ours if "samples_per_s" in row}
    summary = []
    for row in ours:
        if row["stage"] not in measured:
            summary.append({"stage": row["stage"], "missing": row.get("error") or row.get("skipped") or "not measured"})
            continue
        entry = {key: row[key] for key in ("stage", "profile", "deepspeed", "ckpt", "batch", "seq", "device",
                                           "samples_per_s", "model_tflops", "peak_gib", "data_wait_pct")}
        ceiling = _ceiling_for(row, clean)
        if ceiling is not None:
            entry.update(clean_samples_per_s=ceiling["samples_per_s"], clean_peak_gib=ceiling.get("peak_gib"),
                         clean_device=ceiling.get("device"),
                         ratio_to_clean=round(row["samples_per_s"] / ceiling["samples_per_s"], 3))
        if row["profile"] == "fast":
            base = measured.get(row["stage"].removesuffix("_fast"))
            if base is not None:
                entry["fast_gain"] = round(row["samples_per_s"] / base["samples_per_s"], 3)
        summary.append(entry)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bunny.bench.compare", description=__doc__.splitlines()[0])
    parser.add_argument("clean", type=Path, help="clean_loop.py output (JSON lines)")
    parser.add_argument("ours", type=Path, help="bunny.bench.throughput output (JSON lines)")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    for path in (args.clean, args.ours):
        if not path.is_file():
            parser.error(f"{path}: file not found")
    summary = compare(read_json_lines(args.clean), read_json_lines(args.ours))
    for entry in summary:
        print(json.dumps(entry))
    if args.json_out:
        args.json_out.write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
