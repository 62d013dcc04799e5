"""Image loading and the two `--image_aspect_ratio` modes of Bunny.

* ``square``: the image processor resizes the image to its square size, stretching it.
* ``pad``: the image is first centred on a square canvas filled with the processor's mean
  colour (which normalizes to zero), so the processor's resize keeps its aspect ratio.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

ASPECT_RATIOS = ("square", "pad")


def load_image(path: str | Path) -> Image.Image:
    """Decode `path` as an RGB image; the error names the file."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as exc:
        raise OSError(f"cannot read image file {path}: {exc}") from exc


def expand_to_square(image: Image.Image, background_rgb: tuple[int, int, int]) -> Image.Image:
    """`image` centred on a square canvas of side max(width, height) filled with `background_rgb`."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background_rgb)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def _mean_rgb(image_processor: Any) -> tuple[int, int, int]:
    mean = getattr(image_processor, "image_mean", None)
    if mean is None or len(mean) != 3:
        raise ValueError(f"{type(image_processor).__name__} has no 3-channel image_mean for --image_aspect_ratio pad")
    return tuple(int(round(channel * 255)) for channel in mean)  # type: ignore[return-value]


def process_image(image: Image.Image, image_processor: Any, aspect_ratio: str) -> torch.Tensor:
    """Pixel values [3, H, W] of `image` for the vision tower, in `aspect_ratio` mode."""
    if aspect_ratio not in ASPECT_RATIOS:
        raise ValueError(f"--image_aspect_ratio {aspect_ratio!r} is not supported; "
                         f"use one of {', '.join(ASPECT_RATIOS)}")
    if aspect_ratio == "pad":
        image = expand_to_square(image, _mean_rgb(image_processor))
    return image_processor(images=image, return_tensors="pt")["pixel_values"][0]
