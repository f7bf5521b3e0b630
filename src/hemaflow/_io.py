"""Atomic writes: an interrupted stage never leaves a half-written output behind."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from PIL import Image

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "write_note_image",
    "atomic_dir",
    "write_bytes",
    "write_csv",
    "write_figure",
    "write_image",
    "write_json",
    "write_tensors",
    "write_text",
]

_UMASK = os.umask(0)
os.umask(_UMASK)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file through a temporary sibling and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; outputs are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_tensors(path: str | Path, tensors: dict) -> None:
    """Save tensors as safetensors atomically (and readable like any output, unlike save_file's 0600)."""
    from safetensors.torch import save

    write_bytes(path, save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))


def write_figure(path: str | Path, figure: Figure, dpi: int = 110) -> None:
    """Save a matplotlib ``Figure`` (built without pyplot: no global state, no backend) atomically."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format=Path(path).suffix[1:], dpi=dpi)
    write_bytes(path, buffer.getvalue())


def write_image(path: str | Path, image: np.ndarray | Image.Image) -> None:
    """Save an image (format from the suffix) atomically."""
    buffer = io.BytesIO()
    image = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    image.save(buffer, format=Image.registered_extensions()[Path(path).suffix.lower()])
    write_bytes(path, buffer.getvalue())


def _finite(data: object) -> object:
    """NaN and infinities as null: JSON has no NaN, and DVC's metrics diff would choke on it."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_finite(v) for v in data]
    return data


def write_note_image(path: str | Path, text: str) -> None:
    """A small image that says why a plot has nothing to show (a declared output must exist)."""
    from PIL import ImageDraw

    image = Image.new("RGB", (640, 80), "white")
    ImageDraw.Draw(image).text((12, 30), text, fill="black")
    write_image(path, image)


def write_json(path: str | Path, data: object) -> None:
    write_text(path, json.dumps(_finite(data), indent=2, sort_keys=True, allow_nan=False) + "\n")


def write_csv(path: str | Path, frame: pd.DataFrame) -> None:
    write_text(path, frame.to_csv(index=False, lineterminator="\n"))


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a fresh staging folder that replaces ``path`` only if the block completes.

    A staging folder left by an interrupted run is removed first, so a rerun starts clean.
    """
    path = Path(path)
    staging = path.with_name(f".{path.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(path, ignore_errors=True)
    os.replace(staging, path)
