"""Cost of the validation pass's image check: full decode (now) against PIL's verify() (before).

Writes `--images` small JPEGs (and PNGs, one in `--png-every`), then times, interleaved and
`--repeats` times each, `validate_records` with its image check as shipped (every image
decoded to RGB by `load_image`, what training does) and with the old check (open + verify(),
which reads nothing of a JPEG's image data), same thread pool. Prints the median of each and
their ratio.

    python benchmarks/image_check_bench.py --images 50000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bunny.data import validation  # noqa: E402


def verify_only(path: Path) -> str | None:
    """The check before this change: PIL opens and verifies the file."""
    if not path.is_file():
        return f"image file {path} not found"
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as exc:
        return f"image file {path} cannot be read ({type(exc).__name__}: {exc})"
    return None


def write_images(folder: Path, count: int, side: int, png_every: int) -> list[dict]:
    records = []
    for i in range(count):
        image = Image.new("RGB", (side, side), (i % 256, (i * 7) % 256, (i * 13) % 256))
        ImageDraw.Draw(image).ellipse((side // 8, side // 8, side * 3 // 4, side * 5 // 6), fill=(200, 40, 90))
        name = f"{i:06d}.png" if png_every and i % png_every == 0 else f"{i:06d}.jpg"
        image.save(folder / name)
        records.append({"id": str(i), "image": name,
                        "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                          {"from": "gpt", "value": "A shape."}]})
    return records


def image_set_parser(description: str, repeats: int) -> argparse.ArgumentParser:
    """The flags of a benchmark over a synthetic image set (also used by stage_start_bench)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--side", type=int, default=64, help="image side in pixels")
    parser.add_argument("--png-every", type=int, default=10)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=repeats)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = image_set_parser(__doc__.splitlines()[0], repeats=3).parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        started = time.perf_counter()
        records = write_images(folder, args.images, args.side, args.png_every)
        print(f"wrote {args.images} images of {args.side}x{args.side} in {time.perf_counter() - started:.1f} s")
        times: dict[str, list[float]] = {"verify (before)": [], "decode (now)": []}
        for _ in range(args.repeats):
            for name in times:
                patch = mock.patch.object(validation, "_image_file_problem", verify_only) if name.startswith(
                    "verify") else mock.patch.object(validation, "_image_file_problem", validation._image_file_problem)
                with patch:
                    started = time.perf_counter()
                    problems = validation.validate_records(records, folder / "data.json", folder, "phi3",
                                                           workers=args.workers)
                    times[name].append(time.perf_counter() - started)
                assert not problems, problems[:3]
        medians = {name: statistics.median(values) for name, values in times.items()}
        for name, value in medians.items():
            print(f"{name:<16} {value:7.2f} s  ({args.images / value:,.0f} images/s)")
        print(f"ratio decode/verify: {medians['decode (now)'] / medians['verify (before)']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
