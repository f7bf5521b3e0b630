"""Every kind of bad input gives its documented result, and the findings list each one."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from conftest import load
from hemaflow.data.prepare import prepare
from hemaflow.data.report import format_report
from hemaflow.errors import HemaflowError


def _jpeg(rng, width=120, height=100) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture
def bad_dataset(tmp_path):
    rng = np.random.default_rng(0)
    images = tmp_path / "raw" / "smears" / "images"
    images.mkdir(parents=True)
    for name in ("good.jpg", "nan.jpg", "inverted.jpg", "edge.jpg", "far.jpg", "background.jpg"):
        (images / name).write_bytes(_jpeg(rng))
    (images / "big.jpg").write_bytes(_jpeg(rng, 200, 200))
    (images / "truncated.jpg").write_bytes(_jpeg(rng)[:-600])
    (images / "empty.jpg").write_bytes(b"")
    (images / "garbage.jpg").write_bytes(b"\xff\xd8 this is not a jpeg at all" * 3)
    rgba = rng.integers(0, 255, (100, 120, 4), dtype=np.uint8)
    rgba[..., 3] = 128
    Image.fromarray(rgba, "RGBA").save(images / "alpha.png")
    tifffile.imwrite(images / "sixteen.tif", rng.integers(0, 65535, (100, 120, 3), dtype=np.uint16))
    rows = [
        ("good.jpg", 10, 10, 60, 60, "LY"),
        ("big.jpg", 10, 10, 60, 60, "LY"),
        ("truncated.jpg", 10, 10, 60, 60, "MO"),
        ("empty.jpg", 10, 10, 60, 60, "MO"),
        ("garbage.jpg", 10, 10, 60, 60, "MO"),
        ("alpha.png", 10, 10, 60, 60, "EO"),
        ("sixteen.tif", 10, 10, 60, 60, "BA"),
        ("nan.jpg", "", 10, 60, 60, "PNN"),
        ("inverted.jpg", 60, 10, 10, 60, "PNN"),
        ("edge.jpg", 80, 50, 124, 103, "PNN"),  # 4 and 3 px outside a 120x100 image: clipped
        ("far.jpg", 80, 50, 200, 99, "PNN"),  # 80 px outside: rejected
        ("../escape.jpg", 10, 10, 60, 60, "PNN"),
        ("/etc/passwd", 10, 10, 60, 60, "PNN"),
        ("missing.jpg", 10, 10, 60, 60, "PNN"),
    ]
    pd.DataFrame(rows, columns=["NAME", "x1", "y1", "x2", "y2", "class"]).to_csv(
        images.parent / "labels.csv", index=False
    )
    return tmp_path


def _params(root, **dataset):
    entry = {"name": "smears", "format": "cytologia", "path": "smears", "role": "source", "px_per_um": 10.0} | dataset
    return load({"prepare": {"root": str(root / "raw"), "datasets": [entry], "folds": 2, "workers": 0}}).prepare


def _run(root, params):
    prepare(params=params, seed=0, out=root / "prepared", metrics=root / "metrics.json", plots=root / "plots")
    findings = pd.read_csv(root / "prepared" / "findings.csv", keep_default_na=False)
    cells = pd.read_csv(root / "prepared" / "cells.csv", keep_default_na=False)
    return findings, cells


def test_each_bad_input_gets_its_documented_result(bad_dataset):
    findings, cells = _run(bad_dataset, _params(bad_dataset))
    outcome = {(f.file.split("/")[-1], f.action, f.reason) for f in findings.itertuples()}
    expected = {
        ("truncated.jpg", "repaired", "truncated_or_corrupt"),
        ("empty.jpg", "rejected", "unreadable_image"),
        ("garbage.jpg", "rejected", "unreadable_image"),
        ("alpha.png", "converted", "converted_to_rgb8"),
        ("sixteen.tif", "converted", "converted_to_rgb8"),
        ("nan.jpg", "rejected", "invalid_box"),
        ("inverted.jpg", "rejected", "invalid_box"),
        ("edge.jpg", "clipped", "box_outside_image"),
        ("far.jpg", "rejected", "box_outside_image"),
        ("escape.jpg", "rejected", "unsafe_path"),
        ("passwd", "rejected", "unsafe_path"),
        ("missing.jpg", "rejected", "missing_image"),
    }
    assert expected <= outcome
    kept = {c.image.split("/")[-1]: c for c in cells.itertuples()}
    assert set(kept) == {"good.jpg", "big.jpg", "truncated.jpg", "alpha.png", "sixteen.tif", "edge.jpg"}
    assert (kept["edge.jpg"].x2, kept["edge.jpg"].y2) == (120.0, 100.0)
    assert kept["good.jpg"].fine_class == "lymphocyte_typical" and kept["good.jpg"].coarse_class == "lymphocyte"
    for crop in cells["crop"]:
        image = Image.open(bad_dataset / "prepared" / crop)
        assert image.mode == "RGB" and image.size == (64, 64)
    metrics = json.loads((bad_dataset / "metrics.json").read_text())
    assert metrics["rejected"] == 9 and metrics["findings"]["clipped"] == {"box_outside_image": 1}
    # an image no CSV row names is a background field; one whose box was rejected is no field at all
    coco = json.loads((bad_dataset / "prepared" / "coco" / "train.json").read_text())
    coco_val = json.loads((bad_dataset / "prepared" / "coco" / "val.json").read_text())
    names = {i["file_name"].split("__")[-1] for i in coco["images"] + coco_val["images"]}
    assert {"background.png", "good.png", "edge.png"} <= names
    assert not {"far.png", "nan.png", "inverted.png"} & names
    assert ("far.jpg", "rejected", "field_with_rejected_box") in outcome
    report = format_report(bad_dataset / "prepared")
    for name in (
        "truncated.jpg",
        "empty.jpg",
        "garbage.jpg",
        "alpha.png",
        "sixteen.tif",
        "nan.jpg",
        "inverted.jpg",
        "edge.jpg",
        "far.jpg",
        "../escape.jpg",
        "/etc/passwd",
        "missing.jpg",
    ):
        assert name in report, name


def test_unknown_class_stops_with_the_known_ones(bad_dataset):
    labels = bad_dataset / "raw" / "smears" / "labels.csv"
    table = pd.read_csv(labels)
    table.loc[0, "class"] = "Martian"
    table.to_csv(labels, index=False)
    with pytest.raises(HemaflowError) as error:
        _run(bad_dataset, _params(bad_dataset))
    message = str(error.value)
    assert "'Martian'" in message and "labels.csv:2" in message and "lymphocyte_typical" in message
    # mapped explicitly, it is accepted; mapped to null, it is dropped and reported
    _, cells = _run(bad_dataset, _params(bad_dataset, label_map={"Martian": "monocyte"}))
    assert "monocyte" in set(cells.loc[cells["image"].str.endswith("good.jpg"), "fine_class"])
    findings, _ = _run(bad_dataset, _params(bad_dataset, label_map={"Martian": None}))
    assert "dropped_label" in set(findings["reason"])


def test_images_over_the_pixel_limit_are_rejected_before_decoding(bad_dataset):
    params = _params(bad_dataset).model_copy(update={"max_pixels": 20_000})  # 120x100 passes, 200x200 not
    findings, cells = _run(bad_dataset, params)
    assert list(findings.loc[findings["reason"] == "too_many_pixels", "file"].str.split("/").str[-1]) == ["big.jpg"]
    assert not cells["image"].str.endswith("big.jpg").any()
