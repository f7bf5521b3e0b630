"""Training crops of smear cells are cut around the detection that best matches the true box."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from hemaflow.classify.crops import DetectedCrops, match_detections, read_detections, training_crops
from hemaflow.errors import HemaflowError
from hemaflow.params import CropParams


def _cells(rows):
    columns = ["cell_id", "image", "x1", "y1", "x2", "y2", "px_per_um", "crop"]
    return pd.DataFrame(rows, columns=columns)


def test_each_true_box_takes_its_best_detection_when_it_overlaps_enough():
    cells = _cells([
        ("a", "field.png", 10, 10, 50, 50, 1.0, "crops/a.png"),     # detected, 3 px off
        ("b", "field.png", 100, 100, 140, 140, 1.0, "crops/b.png"),  # only a poor detection nearby
        ("c", "single.png", "", "", "", "", 1.0, "crops/c.png"),     # a single-cell image: no box
        ("d", "other.png", 10, 10, 50, 50, 1.0, "crops/d.png"),      # a field the detector found nothing on
    ])  # fmt: skip
    detections = pd.DataFrame(
        [("field.png", 13, 12, 53, 52, 0.9), ("field.png", 13, 12, 53, 52, 0.8), ("field.png", 120, 120, 170, 170, 0.7)],
        columns=["image", "x1", "y1", "x2", "y2", "score"],
    )
    matched = match_detections(cells, detections, min_giou=0.5)
    assert list(matched["crop_from"]) == ["detection", "truth", "image", "truth"]
    assert matched.loc[0, ["crop_x1", "crop_y1", "crop_x2", "crop_y2"]].tolist() == [13, 12, 53, 52]
    assert matched.loc[1, ["crop_x1", "crop_y1", "crop_x2", "crop_y2"]].tolist() == [100, 100, 140, 140]
    union, enclosing = 2 * 1600 - 37 * 38, 43 * 42
    assert matched.loc[0, "match_giou"] == pytest.approx(37 * 38 / union - (enclosing - union) / enclosing)
    assert matched.loc[1, "match_giou"] < 0.5
    assert np.isnan(matched.loc[2, "match_giou"]) and np.isnan(matched.loc[3, "match_giou"])


def test_the_training_crop_is_centred_on_the_detected_box_not_the_true_one(tmp_path):
    field = np.full((200, 200, 3), 200, np.uint8)
    field[100:110, 100:110] = (255, 0, 0)  # the cell's centre, where the detector put its box
    Image.fromarray(field).save(tmp_path / "field.png")
    (tmp_path / "crops").mkdir()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "crops" / "b.png")
    cells = _cells([("a", str(tmp_path / "field.png"), 80, 80, 120, 120, 1.0, "crops/a.png"),
                    ("b", str(tmp_path / "field.png"), 150, 150, 190, 190, 1.0, "crops/b.png")])  # fmt: skip
    detections = pd.DataFrame([(str(tmp_path / "field.png"), 85, 85, 125, 125, 0.9)],
                              columns=["image", "x1", "y1", "x2", "y2", "score"])  # fmt: skip
    detected = DetectedCrops(detections, 0.5, CropParams(fov_um=40, pixels=40, margin_px=0), 10_000_000)
    first, second = training_crops(match_detections(cells, detections, 0.5), tmp_path, detected)
    assert first.shape == (40, 40, 3)
    assert (first[15:25, 15:25] == (255, 0, 0)).all() and tuple(first[14, 14]) == (200, 200, 200)  # centred
    assert not second.any()  # no detection near it: prepare's crop, unchanged


def test_missing_detections_name_the_file_and_the_way_out(tmp_path):
    with pytest.raises(HemaflowError, match=r"train\.csv.*dvc repro detect.*train_boxes: truth"):
        read_detections(tmp_path)
