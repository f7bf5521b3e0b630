"""The ``crop`` stage: the classifier's training crops, cut the way inference cuts them.

At inference the classifier only ever sees crops centred on the detector's boxes, which sit a
little off the annotators' boxes. The CytologIA winners trained on the same kind of crop: each
ground-truth box on a smear field takes the detection with the best GIoU
(``best_giou_matches``, the challenge score's own rule); when that GIoU reaches
``min_match_giou`` the training crop is cut around the detected box and keeps the true label,
otherwise (a missed cell) the crop around the true box is kept. Single-cell images have no box
and keep prepare's crop.

The detections of training fields come from a detector that trained on those fields, so they
are closer to the truth than on a new smear; crops from per-fold detectors would avoid that at
``folds`` times the detector's training cost.

Writes ``out/cells.csv`` (the labelled source cells with ``crop_from``: image / truth /
detection, ``match_giou`` and the box the crop is centred on) and ``out/crops/``.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from hemaflow._io import atomic_dir, write_image, write_json
from hemaflow.data.images import load_rgb
from hemaflow.data.scale import crop_cell
from hemaflow.metrics import best_giou_matches
from hemaflow.params import CropParams, TrainingCropParams
from hemaflow.tables import BOX, boxes, has_box, labelled, read_cells, read_crop, read_detections, write_cells

__all__ = ["CROP_BOX", "crop", "match_detections"]

CROP_BOX = ["crop_x1", "crop_y1", "crop_x2", "crop_y2"]


def match_detections(cells: pd.DataFrame, detections: pd.DataFrame, min_giou: float) -> pd.DataFrame:
    """``cells`` plus where each training crop comes from.

    Adds ``crop_from`` (``image``: a single-cell image, ``truth``: the true box, ``detection``: the
    detection matched to it), ``match_giou`` (GIoU of the best detection, NaN without one) and
    ``crop_x1..crop_y2`` (the box the crop is centred on, NaN for single-cell images).
    """
    boxed = has_box(cells)
    out = cells.assign(crop_from=np.where(boxed, "truth", "image"), match_giou=np.nan)
    out[CROP_BOX] = boxes(cells)
    by_image = dict(tuple(detections.groupby("image")))
    for image, rows in out[boxed].groupby("image"):
        found = by_image.get(image)
        if found is None or found.empty:
            continue
        candidates = np.unique(found[BOX].to_numpy(float), axis=0)  # the indices best_giou_matches returns
        best, giou, _ = best_giou_matches(rows[CROP_BOX].to_numpy(float), candidates)
        out.loc[rows.index, "match_giou"] = giou
        matched = giou >= min_giou
        out.loc[rows.index[matched], CROP_BOX] = candidates[best[matched]]
        out.loc[rows.index[matched], "crop_from"] = "detection"
    return out


def _training_crops(cells: pd.DataFrame, prepared: Path, geometry: CropParams, max_pixels: int) -> Iterator[np.ndarray]:
    @lru_cache(maxsize=2)  # a field's cells are consecutive rows: decode each field once
    def field(path: str) -> np.ndarray:
        return load_rgb(Path(path), max_pixels)[0]

    for row in cells.itertuples():
        if row.crop_from == "detection":
            box = (row.crop_x1, row.crop_y1, row.crop_x2, row.crop_y2)
            yield crop_cell(field(row.image), box, row.px_per_um, geometry.fov_um, geometry.pixels, geometry.margin_px)[
                0
            ]
        else:
            yield read_crop(prepared / row.crop)


def crop(
    *,
    params: TrainingCropParams,
    geometry: CropParams,
    max_pixels: int,
    prepared: Path,
    detections: Path,
    out: Path,
    metrics: Path,
) -> None:
    """Write the labelled source cells' training crops to ``out`` and how they were cut to ``metrics``."""
    source = labelled(read_cells(prepared), "source")
    detected = params.train_boxes == "detected" and has_box(source).any()  # single-cell data needs no detector
    found = read_detections(detections, ("train", "val") if detected else ())
    source = match_detections(source, found, params.min_match_giou)
    with atomic_dir(out) as staging:
        crops = _training_crops(source, prepared, geometry, max_pixels)
        for cell_id, image in tqdm(
            zip(source["cell_id"], crops, strict=True), total=len(source), desc="crop", unit="cell"
        ):
            write_image(staging / "crops" / f"{cell_id}.png", image)
        write_cells(staging, source.assign(crop=[f"crops/{c}.png" for c in source["cell_id"]]))
    giou = source["match_giou"].dropna()
    write_json(
        metrics,
        {
            "train_boxes": params.train_boxes,
            "cells": len(source),
            "crops_from": {origin: int(n) for origin, n in source["crop_from"].value_counts().sort_index().items()},
            "mean_match_giou": float(giou.mean()) if len(giou) else None,
        },
    )
