"""Physical scale: boxes, crops and fields in micrometres rather than each scanner's pixels."""

from __future__ import annotations

import numpy as np
from PIL import Image

from hemaflow.tables import Box

__all__ = ["clip_box", "crop_cell", "rescale", "rescale_box"]


def clip_box(box: Box, width: int, height: int, tolerance_px: float) -> tuple[Box, bool]:
    """Clip a box to the image when it pokes out by at most ``tolerance_px``; ValueError otherwise."""
    x1, y1, x2, y2 = box
    overshoot = max(-x1, -y1, x2 - width, y2 - height, 0.0)
    if overshoot > tolerance_px:
        raise ValueError(
            f"box {box} lies {overshoot:g} px outside the {width}x{height} image (tolerance {tolerance_px:g})"
        )
    clipped = (max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height)))
    if clipped[0] >= clipped[2] or clipped[1] >= clipped[3]:
        raise ValueError(f"box {box} is empty once clipped to the {width}x{height} image")
    return clipped, overshoot > 0


def rescale_box(box: Box, factor: float) -> Box:
    return tuple(v * factor for v in box)  # type: ignore[return-value]


def rescale(image: np.ndarray, factor: float) -> np.ndarray:
    """Resample an RGB image by ``factor`` with an antialiasing filter."""
    height, width = image.shape[:2]
    target = (max(round(width * factor), 1), max(round(height * factor), 1))
    if target == (width, height):
        return image
    return np.asarray(Image.fromarray(image).resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0))


def crop_cell(
    image: np.ndarray, box: Box | None, px_per_um: float, fov_um: float, pixels: int, margin_px: int
) -> tuple[np.ndarray, bool]:
    """A square crop of ``fov_um`` centred on the cell, resampled to ``pixels``.

    The field of view grows (and the returned flag is True) when the box plus margin does not
    fit, so no cell is ever cut. Areas outside the image repeat its edge.
    """
    height, width = image.shape[:2]
    if box is None:  # a single-cell image: the cell is centred
        box = (0.0, 0.0, float(width), float(height))
        needed = 0.0
    else:
        scale = pixels / (fov_um * px_per_um)  # crop pixels per native pixel
        needed = max(box[2] - box[0], box[3] - box[1]) + 2 * margin_px / scale
    side = fov_um * px_per_um
    grown = needed > side
    side = max(side, needed)
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    left, top = round(cx - side / 2), round(cy - side / 2)
    size = round(side)
    pad = max(-left, -top, left + size - width, top + size - height, 0)
    if pad:
        image = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    square = image[top + pad : top + pad + size, left + pad : left + pad + size]
    resized = Image.fromarray(square).resize((pixels, pixels), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return np.asarray(resized), grown
