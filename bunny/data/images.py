"""Image loading and the two `--image_aspect_ratio` modes of Bunny.

* ``square``: the image processor resizes the image to its square size, stretching it.
* ``pad``: the image is first centred on a square canvas filled with the processor's mean
  colour, truncated to 8 bits as the original does (``int(0.5 * 255) = 127``), so the
  processor's resize keeps its aspect ratio.

Every image becomes 8-bit RGB in `load_image`, the one decoder that both training and the
validation pass use, so an image that validates is one that trains:

* 16-bit images (PIL modes ``I;16``, ``I;16B``, ``I;16L``, ``I;16N``) are scaled to 8 bits
  (``round(v / 257)``, 65535 -> 255); PIL's own ``convert("RGB")`` clips them instead, which
  turns a 0-65535 gradient almost entirely white.
* 32-bit integer and float images (modes ``I`` and ``F``) are refused by name: their value
  range is not defined by the format, so no scaling would be right for every file.
* An alpha channel (``RGBA``, ``LA``, ``P`` with transparency) is dropped, keeping the colour
  stored under each pixel: that is what the original's ``convert("RGB")`` does, at training
  and at inference, so a model trained here sees what Bunny's evaluation code shows it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

ASPECT_RATIOS = ("square", "pad")
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
UNSCALED_MODES = {"I": "32-bit integer", "F": "32-bit float"}


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB of a decoded `image`: 16-bit scaled, alpha dropped; ValueError for I and F."""
    if image.mode in SIXTEEN_BIT_MODES:
        levels = np.asarray(image).astype(np.float32)
        return Image.fromarray(np.rint(levels / 257.0).astype(np.uint8), mode="L").convert("RGB")
    if image.mode in UNSCALED_MODES:
        raise ValueError(f"{UNSCALED_MODES[image.mode]} image (PIL mode {image.mode}) has no defined range "
                         "to scale to 8 bits; convert it to 8- or 16-bit first")
    return image if image.mode == "RGB" else image.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """Decode the whole of `path` as 8-bit RGB (see the module notes); the error names the file."""
    try:
        with Image.open(path) as image:
            image.load()  # decodes every byte: a truncated file fails here, not mid-training
            return to_rgb(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
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


def pad_colour(image_processor: Any) -> tuple[int, int, int]:
    """The `pad` canvas colour: the processor's mean, ``int(mean * 255)`` per channel as in Bunny."""
    mean = getattr(image_processor, "image_mean", None)
    if mean is None or len(mean) != 3:
        raise ValueError(f"{type(image_processor).__name__} has no 3-channel image_mean for --image_aspect_ratio pad")
    return tuple(int(channel * 255) for channel in mean)  # type: ignore[return-value]


def process_image(image: Image.Image, image_processor: Any, aspect_ratio: str) -> torch.Tensor:
    """Pixel values [3, H, W] of `image` for the vision tower, in `aspect_ratio` mode."""
    if aspect_ratio not in ASPECT_RATIOS:
        raise ValueError(f"--image_aspect_ratio {aspect_ratio!r} is not supported; "
                         f"use one of {', '.join(ASPECT_RATIOS)}")
    if aspect_ratio == "pad":
        image = expand_to_square(image, pad_colour(image_processor))
    return image_processor(images=image, return_tensors="pt")["pixel_values"][0]
