"""The tables stages hand each other: one reader and one writer per file, the column names in one place.

- ``cells.csv`` (``prepare``, ``crop``, ``translate``): one row per cell, ``CELL_COLUMNS``; boxes in
  original-image pixels, empty for single-cell images (the cell is centred); ``crop`` is the cell
  image relative to the folder holding the table.
- ``images.csv`` (``prepare``): one row per accepted image, ``field`` the rescaled smear field
  the detector sees (empty for single-cell images).
- ``<split>.csv`` detections (``detect``): ``DETECTION_COLUMNS``, boxes in original pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from hemaflow._io import write_csv
from hemaflow.errors import HemaflowError

__all__ = [
    "BOX",
    "Box",
    "CELL_COLUMNS",
    "DETECTIONS_CARD",
    "DETECTION_COLUMNS",
    "IMAGE_KEY",
    "boxes",
    "field_boxes",
    "has_box",
    "labelled",
    "on_images",
    "read_cells",
    "read_crop",
    "read_crops",
    "read_detections",
    "read_detections_card",
    "read_images",
    "source_and_target",
    "write_cells",
]

BOX = ["x1", "y1", "x2", "y2"]
Box = tuple[float, float, float, float]  # x1, y1, x2, y2 in image pixels
CELL_COLUMNS = [
    "cell_id",
    "image",
    *BOX,
    "fine_class",
    "coarse_class",
    "source_label",
    "dataset",
    "domain",
    "role",
    "fold",
    "split",
    "px_per_um",
    "crop",
]
DETECTION_COLUMNS = ["image", *BOX, "score"]
# What names an image in cells.csv and images.csv: one image file may serve several datasets (a
# target's unlabelled and test parts), so the file alone does not.
IMAGE_KEY = ["dataset", "image"]
DETECTIONS_CARD = "detector.json"  # beside the detection CSVs: which detector found them, or that none was trained


def _read(path: Path, stage: str) -> pd.DataFrame:
    if not path.is_file():
        raise HemaflowError(f"{path}: not found (run `dvc repro {stage}` first)")
    return pd.read_csv(path, keep_default_na=False)


def read_cells(folder: Path, stage: str = "prepare") -> pd.DataFrame:
    """``folder/cells.csv``; text columns keep empty strings (no NaN), boxes of single-cell images are ''."""
    return _read(Path(folder) / "cells.csv", stage)


def write_cells(folder: Path, cells: pd.DataFrame) -> None:
    write_csv(Path(folder) / "cells.csv", cells)


def read_images(folder: Path) -> pd.DataFrame:
    return _read(Path(folder) / "images.csv", "prepare")


def has_box(cells: pd.DataFrame) -> pd.Series:
    """True for cells on smear fields (a box), False for single-cell images."""
    return cells["x1"].astype(str) != ""


def boxes(frame: pd.DataFrame) -> np.ndarray:
    """The N x 4 box array of a cells or detections table (NaN where a cell has no box)."""
    return frame[BOX].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64).reshape(-1, 4)


def on_images(rows: pd.DataFrame, images: pd.DataFrame) -> np.ndarray:
    """Which ``rows`` (cells or images) lie on one of ``images``, matched on ``IMAGE_KEY``."""
    return pd.MultiIndex.from_frame(rows[IMAGE_KEY]).isin(pd.MultiIndex.from_frame(images[IMAGE_KEY]))


def field_boxes(fields: pd.DataFrame, cells: pd.DataFrame) -> dict[str, np.ndarray]:
    """The true boxes of each field (rows of images.csv), keyed by image file as detections are: a
    file that serves two datasets gets the boxes of the dataset it is a field of, not both."""
    by_key = dict(tuple(cells.groupby(IMAGE_KEY)))
    return {f.image: boxes(by_key.get((f.dataset, f.image), cells.iloc[:0])) for f in fields.itertuples()}


def labelled(cells: pd.DataFrame, role: str | None = None) -> pd.DataFrame:
    """The cells with a class (of one role, when given)."""
    chosen = cells["fine_class"] != ""
    if role is not None:
        chosen &= cells["role"] == role
    return cells[chosen]


def source_and_target(prepared: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The labelled source cells and the target-role cells of a prepared folder (what adaptation sees)."""
    cells = read_cells(prepared)
    source, target = labelled(cells, "source"), cells[cells["role"] == "target"]
    for name, frame in (("labelled source", source), ("target", target)):
        if frame.empty:
            raise HemaflowError(
                f"{Path(prepared) / 'cells.csv'}: no {name} cells; adaptation needs both domains "
                "(give an unlabelled dataset role: target)"
            )
    return source, target


def read_crop(path: Path) -> np.ndarray:
    """A crop a stage wrote, as H x W x 3 uint8."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def read_crops(folder: Path, cells: pd.DataFrame) -> list[np.ndarray]:
    return [read_crop(Path(folder) / name) for name in cells["crop"]]


def read_detections_card(folder: Path) -> dict:
    """The detect stage's note beside its CSVs: ``detector`` ("none" when the data had no smear field), ``score_threshold``."""
    path = Path(folder) / DETECTIONS_CARD
    if not path.is_file():
        raise HemaflowError(f"{path}: not found (run `dvc repro detect` first)")
    return json.loads(path.read_text())


def read_detections(folder: Path, splits: tuple[str, ...]) -> pd.DataFrame:
    """The detect stage's boxes on the fields of ``splits``."""
    frames = [_read(Path(folder) / f"{split}.csv", "detect") for split in splits]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=DETECTION_COLUMNS)
