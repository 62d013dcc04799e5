"""A training stage's data validation at start, without and with preflight's validation record.

Writes `--images` small images (as `image_check_bench.py` does) and their data file, then times,
interleaved and `--repeats` times each, `validate_dataset` as train.py runs it by hand (every
image decoded) and as a stage launched by the flow runs it (a matching validation record: the
data file hashed, every image stat'ed, none decoded). Also prints what preflight pays to take
the record. Prints the medians and their ratio.

    python benchmarks/stage_start_bench.py --images 50000
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from image_check_bench import image_set_parser, write_images  # noqa: E402

from bunny.data import load_records, validate_dataset  # noqa: E402
from bunny.data.validation import validation_record_content, write_validation_record  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    args = image_set_parser(__doc__.splitlines()[0], repeats=1).parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        started = time.perf_counter()
        data_path = folder / "data.json"
        data_path.write_text(json.dumps(write_images(folder, args.images, args.side, args.png_every)))
        print(f"wrote {args.images} images of {args.side}x{args.side} in {time.perf_counter() - started:.1f} s")
        started = time.perf_counter()
        record_path = folder / "validation-record.json"
        write_validation_record(record_path, validation_record_content(data_path, folder, load_records(data_path)))
        print(f"preflight's record: {time.perf_counter() - started:.2f} s to take and write")
        times: dict[str, list[float]] = {"full (before)": [], "record (now)": []}
        for _ in range(args.repeats):
            for name in times:
                record = record_path if name.startswith("record") else None
                started = time.perf_counter()
                records = validate_dataset(data_path, folder, "phi3", workers=args.workers, validation_record=record)
                times[name].append(time.perf_counter() - started)
                assert len(records) == args.images
        medians = {name: statistics.median(values) for name, values in times.items()}
        for name, value in medians.items():
            print(f"{name:<14} {value:7.2f} s")
        print(f"ratio record/full: {medians['record (now)'] / medians['full (before)']:.4f} "
              f"({medians['full (before)'] / medians['record (now)']:.0f}x faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
