"""Decode any input image fully into RGB uint8, repairing what a re-save can recover."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, ImageFile

from hemaflow.errors import HemaflowError

__all__ = ["IMAGE_SUFFIXES", "MAX_FIELD_PIXELS", "ImageRejected", "expand_images", "load_rgb"]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}

# Smear regions far larger than a single-cell image are the point of tiled detection; still refuse
# what would not fit in memory decoded (400 Mpx x 3 bytes = 1.2 GB).
MAX_FIELD_PIXELS = 400_000_000


class ImageRejected(Exception):
    """The image cannot be used; ``reason`` is a short code, the message says why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def _to_rgb8(array: np.ndarray) -> tuple[np.ndarray, str | None]:
    """Any numeric H x W (x C) array -> H x W x 3 uint8, and what was converted (None: nothing)."""
    notes = []
    if array.ndim == 3 and array.shape[0] in (3, 4) and array.shape[-1] not in (3, 4):
        array = np.moveaxis(array, 0, -1)  # planar TIFF
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.floating):
            peak = 1.0 if float(np.nanmax(array)) <= 1.0 else float(np.nanmax(array))
            array = np.nan_to_num(array) / peak * 255.0
        else:
            bits = np.iinfo(array.dtype).bits
            array = array.astype(np.float64) / (2**bits - 1) * 255.0
            notes.append(f"{bits}-bit to 8-bit")
        array = np.clip(np.round(array), 0, 255).astype(np.uint8)
    if array.ndim == 2:
        array = array[..., None]
    if array.shape[-1] in (2, 4):  # grey+alpha or RGBA: composite over white
        colour, alpha = array[..., :-1].astype(np.float64), array[..., -1:].astype(np.float64) / 255.0
        if (alpha < 1.0).any():
            notes.append("transparency composited on white")
            array = np.round(colour * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
        else:
            array = array[..., :-1]
    if array.shape[-1] == 1:
        notes.append("grey to RGB")
        array = np.repeat(array, 3, axis=-1)
    if array.shape[-1] != 3:
        raise ImageRejected("unsupported_image", f"{array.shape[-1]} channels")
    return np.ascontiguousarray(array), "; ".join(notes) or None


def _pil_array(image: Image.Image) -> tuple[np.ndarray, str | None]:
    note = None
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")
        note = "palette to RGB"
    elif image.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        note = f"{image.mode} to RGB"
        image = image.convert("RGB")
    elif image.mode == "1":
        image = image.convert("L")
    array, converted = _to_rgb8(np.asarray(image))
    return array, "; ".join(n for n in (note, converted) if n) or None


def load_rgb(path: Path, max_pixels: int) -> tuple[np.ndarray, str | None, str | None]:
    """Fully decode ``path``; return (RGB uint8 array, conversion note, repair note).

    Raises ImageRejected when the file is missing, empty, too large or cannot be decoded even
    leniently. Size is checked from the header, before any pixel is decoded.
    """
    if not path.exists():
        raise ImageRejected("missing_image", "file not found")
    if path.stat().st_size == 0:
        raise ImageRejected("unreadable_image", "empty file")
    if path.suffix.lower() in (".tif", ".tiff"):
        try:
            with tifffile.TiffFile(path) as tif:
                shape = tif.pages[0].shape
                if int(np.prod(shape[:2])) > max_pixels:
                    raise ImageRejected("too_many_pixels", f"{shape[1]}x{shape[0]} exceeds max_pixels={max_pixels}")
                array = tif.pages[0].asarray()
            rgb, note = _to_rgb8(array)
            return rgb, note, None
        except ImageRejected:
            raise
        except Exception:  # not a TIFF tifffile can read: let Pillow try, leniently, below
            pass
    try:
        with Image.open(path) as image:
            if image.width * image.height > max_pixels:
                raise ImageRejected("too_many_pixels", f"{image.width}x{image.height} exceeds max_pixels={max_pixels}")
            try:
                image.load()
                array, note = _pil_array(image)
                return array, note, None
            except OSError as strict_error:
                first_error = str(strict_error)
    except ImageRejected:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageRejected("too_many_pixels", str(exc)) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageRejected("unreadable_image", f"cannot decode: {exc}") from None
    # A truncated or partly corrupt file: decode what is there (the repair a re-save performs).
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        with Image.open(path) as image:
            image.load()
            array, note = _pil_array(image)
        return array, note, f"re-saved after decode error ({first_error})"
    except Exception as exc:
        raise ImageRejected("unreadable_image", f"corrupt beyond repair: {exc}") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False


def expand_images(inputs: Sequence[Path]) -> list[Path]:
    """Files as given, folders expanded to the images under them (sorted)."""
    paths: list[Path] = []
    for item in inputs:
        if item.is_dir():
            paths += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.exists():
            paths.append(item)
        else:
            raise HemaflowError(f"{item}: no such file or folder")
    if not paths:
        raise HemaflowError("no images found in the given paths")
    return paths
