"""Background fields derived from fields with cells (Otsu mask + inpainting)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from conftest import TINY_DEMO, load
from hemaflow.data.backgrounds import erase_cells
from hemaflow.data.demo import demo_data
from hemaflow.data.prepare import prepare


def _field():
    field = np.full((80, 120, 3), (230, 222, 212), np.uint8)
    yy, xx = np.mgrid[:80, :120]
    field[(yy - 40) ** 2 + (xx - 95) ** 2 < 100] = (205, 125, 125)  # a red cell outside the box
    field[(yy - 40) ** 2 + (xx - 30) ** 2 < 225] = (95, 60, 150)  # the white cell in the box
    return field


def test_the_white_cell_is_painted_out_and_the_rest_kept():
    field = _field()
    erased = erase_cells(field, [(12.0, 22.0, 48.0, 58.0)])
    gray = erased.astype(float).mean(axis=2)
    assert gray[22:58, 12:48].min() > 180  # no stained pixel left where the cell was
    assert np.array_equal(erased[:, 50:], field[:, 50:])  # outside the box nothing moves
    assert np.array_equal(erase_cells(field, []), field)


def test_prepare_derives_backgrounds_when_the_data_has_none(tmp_path):
    params = load(
        {
            "demo_data": TINY_DEMO | {"background_fields": 0.0, "workers": 1},
            "prepare": {"root": str(tmp_path / "demo"), "folds": 2, "workers": 0},
        }
    )
    demo_data(params=params.demo_data, seed=3, out=tmp_path / "demo")
    prepare(
        params=params.prepare,
        seed=3,
        out=tmp_path / "prepared",
        metrics=tmp_path / "data.json",
        plots=tmp_path / "plots",
    )
    coco = json.loads((tmp_path / "prepared" / "coco" / "train.json").read_text())
    annotated = {a["image_id"] for a in coco["annotations"]}
    backgrounds = [i for i in coco["images"] if i["id"] not in annotated]
    assert backgrounds and all(i["file_name"].endswith("__background.png") for i in backgrounds)
    assert len(backgrounds) / len(coco["images"]) >= params.prepare.fields.min_background
    assert all((tmp_path / "prepared" / i["file_name"]).is_file() for i in backgrounds)
    findings = pd.read_csv(tmp_path / "prepared" / "findings.csv")
    assert (findings["action"] == "derived").sum() == len(backgrounds)
    for split in ("val", "test"):  # only training gets derived fields
        names = [
            i["file_name"] for i in json.loads((tmp_path / "prepared" / "coco" / f"{split}.json").read_text())["images"]
        ]
        assert not any("__background" in n for n in names)
