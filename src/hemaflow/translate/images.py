"""Image conversions and the sample grid shared by the translation stage."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from hemaflow._io import write_image

__all__ = ["from_uint8", "sample_grid", "to_uint8"]


def to_uint8(batch: torch.Tensor) -> list[np.ndarray]:
    """N x 3 x H x W in [-1, 1] -> H x W x 3 uint8 images."""
    array = ((batch.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return list(array)


def from_uint8(images: Sequence[np.ndarray]) -> torch.Tensor:
    """H x W x 3 uint8 images -> N x 3 x H x W in [-1, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def sample_grid(rows: Sequence[Sequence[np.ndarray]], labels: Sequence[str], out: Path, label_px: int = 90) -> None:
    """A PNG with one labelled row per image list (all images the same size)."""
    height, width = rows[0][0].shape[:2]
    columns = max(len(r) for r in rows)
    canvas = Image.new("RGB", (label_px + columns * (width + 2), len(rows) * (height + 2)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (row, label) in enumerate(zip(rows, labels, strict=True)):
        top = r * (height + 2)
        draw.text((4, top + height // 2 - 5), label, fill="black")
        for c, image in enumerate(row):
            canvas.paste(Image.fromarray(image), (label_px + c * (width + 2), top))
    write_image(out, canvas)
