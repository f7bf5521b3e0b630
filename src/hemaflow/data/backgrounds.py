"""Background fields derived from fields with cells, as the CytologIA winner did.

Fields without any white cell teach the detector what is not a cell (red cells, platelets,
stain debris). Real datasets rarely ship them, so some training fields are turned into
background fields: inside each white cell's box, the pixels darker than the field's Otsu
threshold (the stained cell, whatever its class) are masked, the mask is dilated, and the hole
is filled by inpainting from the surrounding plasma and red cells.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

__all__ = ["erase_cells"]


def erase_cells(rgb: np.ndarray, boxes: Sequence[Sequence[float]], dilate_px: int = 3) -> np.ndarray:
    """The field with the white cells inside ``boxes`` (x1, y1, x2, y2 pixels) painted out."""
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    threshold, _ = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    inside = np.zeros(gray.shape, np.uint8)
    height, width = gray.shape
    for x1, y1, x2, y2 in boxes:
        left, top = max(int(np.floor(x1)), 0), max(int(np.floor(y1)), 0)
        right, bottom = min(int(np.ceil(x2)), width), min(int(np.ceil(y2)), height)
        inside[top:bottom, left:right] = 1
    mask = ((gray <= threshold) & (inside == 1)).astype(np.uint8) * 255
    # close the gaps between nucleus lobes and granules, then reach the cell's pale rim
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilate_px + 1, 2 * dilate_px + 1))
    mask = cv2.dilate(cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel), kernel) & (inside * 255)
    return cv2.inpaint(rgb, mask, inpaintRadius=max(2 * dilate_px, 3), flags=cv2.INPAINT_TELEA)
