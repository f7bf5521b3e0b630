"""The crop stage: smear cells' training crops are cut around the detection that best matches the true box."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import load
from hemaflow.data.crop import CROP_BOX, crop, match_detections
from hemaflow.errors import HemaflowError

COLUMNS = ["cell_id", "image", "x1", "y1", "x2", "y2", "fine_class", "role", "px_per_um", "crop"]


def _cells(rows):
    return pd.DataFrame(rows, columns=COLUMNS)


def test_each_true_box_takes_its_best_detection_when_it_overlaps_enough():
    cells = _cells(
        [
            ("a", "field.png", 10, 10, 50, 50, "LY", "source", 1.0, "crops/a.png"),  # detected, 3 px off
            ("b", "field.png", 100, 100, 140, 140, "LY", "source", 1.0, "crops/b.png"),  # only a poor detection nearby
            ("c", "single.png", "", "", "", "", "LY", "source", 1.0, "crops/c.png"),  # a single-cell image: no box
            ("d", "other.png", 10, 10, 50, 50, "LY", "source", 1.0, "crops/d.png"),  # a field with nothing found
        ]
    )
    detections = pd.DataFrame(
        [
            ("field.png", 13, 12, 53, 52, 0.9),
            ("field.png", 13, 12, 53, 52, 0.8),
            ("field.png", 120, 120, 170, 170, 0.7),
        ],
        columns=["image", "x1", "y1", "x2", "y2", "score"],
    )
    matched = match_detections(cells, detections, min_giou=0.5)
    assert list(matched["crop_from"]) == ["detection", "truth", "image", "truth"]
    assert matched.loc[0, CROP_BOX].tolist() == [13, 12, 53, 52]
    assert matched.loc[1, CROP_BOX].tolist() == [100, 100, 140, 140]
    union, enclosing = 2 * 1600 - 37 * 38, 43 * 42
    assert matched.loc[0, "match_giou"] == pytest.approx(37 * 38 / union - (enclosing - union) / enclosing)
    assert matched.loc[1, "match_giou"] < 0.5
    assert np.isnan(matched.loc[2, "match_giou"]) and np.isnan(matched.loc[3, "match_giou"])


def _prepared(tmp_path):
    field = np.full((200, 200, 3), 200, np.uint8)
    field[100:110, 100:110] = (255, 0, 0)  # the cell's centre, where the detector put its box
    Image.fromarray(field).save(tmp_path / "field.png")
    prepared = tmp_path / "prepared"
    (prepared / "crops").mkdir(parents=True)
    for name in ("a", "b"):
        Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(prepared / "crops" / f"{name}.png")
    cells = _cells(
        [
            ("a", str(tmp_path / "field.png"), 80, 80, 120, 120, "LY", "source", 1.0, "crops/a.png"),
            ("b", str(tmp_path / "field.png"), 150, 150, 190, 190, "LY", "source", 1.0, "crops/b.png"),
        ]
    )
    cells.to_csv(prepared / "cells.csv", index=False)
    detections = tmp_path / "detections"
    detections.mkdir()
    columns = ["image", "x1", "y1", "x2", "y2", "score"]
    pd.DataFrame([(str(tmp_path / "field.png"), 85, 85, 125, 125, 0.9)], columns=columns).to_csv(
        detections / "train.csv", index=False
    )
    pd.DataFrame(columns=columns).to_csv(detections / "val.csv", index=False)
    return prepared, detections


def test_the_training_crop_is_centred_on_the_detected_box_not_the_true_one(tmp_path):
    prepared, detections = _prepared(tmp_path)
    params = load(
        {
            "crop": {"train_boxes": "detected", "min_match_giou": 0.5},
            "prepare": {"crop": {"fov_um": 40, "pixels": 40, "margin_px": 0}},
        }
    )
    crop(
        params=params.crop,
        geometry=params.prepare.crop,
        max_pixels=10_000_000,
        prepared=prepared,
        detections=detections,
        out=tmp_path / "crops",
        metrics=tmp_path / "crop.json",
    )
    cells = pd.read_csv(tmp_path / "crops" / "cells.csv")
    first, second = (np.asarray(Image.open(tmp_path / "crops" / c)) for c in cells["crop"])
    assert (first[15:25, 15:25] == (255, 0, 0)).all() and tuple(first[14, 14]) == (200, 200, 200)  # centred
    assert not second.any()  # no detection near it: prepare's crop, unchanged
    assert json.loads((tmp_path / "crop.json").read_text())["crops_from"] == {"detection": 1, "truth": 1}


def test_missing_detections_name_the_file_and_the_stage_to_run(tmp_path):
    prepared, detections = _prepared(tmp_path)
    (detections / "train.csv").unlink()
    params = load()
    with pytest.raises(HemaflowError, match=r"train\.csv: not found \(run `dvc repro detect` first\)"):
        crop(
            params=params.crop,
            geometry=params.prepare.crop,
            max_pixels=10_000_000,
            prepared=prepared,
            detections=detections,
            out=tmp_path / "crops",
            metrics=tmp_path / "crop.json",
        )
