"""Training crops cut the way inference cuts them: around detected boxes.

At inference the classifier only ever sees crops centred on the detector's boxes, which sit a
little off the annotators' boxes. The CytologIA winners trained on the same kind of crop: each
ground-truth box on a smear field takes the detection with the best GIoU (``best_giou_matches``,
the challenge score's own rule); when that GIoU reaches ``min_giou`` the training crop is cut
around the detected box and keeps the true label, otherwise (a missed cell) the crop around the
true box is kept. Single-cell images have no box and keep prepare's crop.

The detections of training fields come from a detector that trained on those fields, so they
are closer to the truth than on a new smear; crops from per-fold detectors would avoid that at
``folds`` times the detector's training cost.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from hemaflow.data.images import load_rgb
from hemaflow.data.scale import crop_cell
from hemaflow.errors import HemaflowError
from hemaflow.metrics import best_giou_matches
from hemaflow.params import CropParams

__all__ = ["DetectedCrops", "match_detections", "read_crop", "read_detections", "training_crops"]

BOX = ["x1", "y1", "x2", "y2"]
CROP_BOX = ["crop_x1", "crop_y1", "crop_x2", "crop_y2"]


@dataclass(frozen=True)
class DetectedCrops:
    """What cutting crops around matched detections needs."""

    detections: pd.DataFrame  # image, x1, y1, x2, y2 (original pixels), as the detect stage writes them
    min_giou: float
    crop: CropParams
    max_pixels: int


def read_detections(folder: Path, splits: tuple[str, ...] = ("train", "val")) -> pd.DataFrame:
    """The detect stage's boxes on the fields of ``splits`` (the ones labelled cells come from)."""
    missing = [str(folder / f"{split}.csv") for split in splits if not (folder / f"{split}.csv").is_file()]
    if missing:
        raise HemaflowError(f"{', '.join(missing)} not found: run `dvc repro detect` first, "
                            "or set classify.train_boxes: truth")  # fmt: skip
    return pd.concat([pd.read_csv(folder / f"{split}.csv") for split in splits], ignore_index=True)


def match_detections(cells: pd.DataFrame, detections: pd.DataFrame, min_giou: float) -> pd.DataFrame:
    """``cells`` plus where each training crop comes from.

    Adds ``crop_from`` (``image``: a single-cell image, ``truth``: the true box, ``detection``: the
    detection matched to it), ``match_giou`` (GIoU of the best detection, NaN without one) and
    ``crop_x1..crop_y2`` (the box the crop is centred on, NaN for single-cell images).
    """
    boxes = cells[BOX].apply(pd.to_numeric, errors="coerce")  # empty for single-cell images
    has_box = boxes.notna().all(axis=1)
    out = cells.assign(crop_from=np.where(has_box, "truth", "image"), match_giou=np.nan)
    out[CROP_BOX] = boxes.to_numpy(float)
    by_image = dict(tuple(detections.groupby("image")))
    for image, rows in out[has_box].groupby("image"):
        found = by_image.get(image)
        if found is None or found.empty:
            continue
        truth = rows[CROP_BOX].to_numpy(float)
        boxes = np.unique(found[BOX].to_numpy(float), axis=0)  # the indices best_giou_matches returns
        best, giou, _ = best_giou_matches(truth, boxes)
        out.loc[rows.index, "match_giou"] = giou
        matched = giou >= min_giou
        out.loc[rows.index[matched], CROP_BOX] = boxes[best[matched]]
        out.loc[rows.index[matched], "crop_from"] = "detection"
    return out


def training_crops(cells: pd.DataFrame, prepared: Path, detected: DetectedCrops | None) -> Iterator[np.ndarray]:
    """Each row's training crop (RGB uint8): cut around its matched detection, else prepare's crop.

    ``cells`` is ``match_detections``' output when ``detected`` is given.
    """

    @lru_cache(maxsize=2)  # a field's cells are consecutive rows: decode each field once
    def field(path: str) -> np.ndarray:
        return load_rgb(Path(path), detected.max_pixels)[0]

    for row in cells.itertuples():
        if detected is not None and row.crop_from == "detection":
            box = (row.crop_x1, row.crop_y1, row.crop_x2, row.crop_y2)
            yield crop_cell(field(row.image), box, row.px_per_um, detected.crop.fov_um, detected.crop.pixels,
                            detected.crop.margin_px)[0]  # fmt: skip
        else:
            yield read_crop(prepared / row.crop)


def read_crop(path: Path) -> np.ndarray:
    """A crop prepare (or translate) wrote, as RGB uint8."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))
