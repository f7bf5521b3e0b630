from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from conftest import TINY_DEMO
from hemaflow.data.demo import demo_data
from hemaflow.params import DemoDataParams


def _digest(root):
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    demo_data(params=DemoDataParams(**TINY_DEMO, workers=2), seed=7, out=out)
    return out


def test_same_params_give_the_same_bytes_whatever_the_worker_count(demo, tmp_path):
    demo_data(params=DemoDataParams(**TINY_DEMO, workers=1), seed=7, out=tmp_path / "again")
    assert _digest(demo) == _digest(tmp_path / "again")


def test_another_seed_gives_other_images(demo, tmp_path):
    demo_data(params=DemoDataParams(**TINY_DEMO, workers=2), seed=8, out=tmp_path / "other")
    assert _digest(demo) != _digest(tmp_path / "other")


def test_native_layouts_and_physical_sizes(demo):
    assert sorted(p.name for p in (demo / "acevedo").iterdir()) == [
        "basophil",
        "eosinophil",
        "lymphocyte",
        "monocyte",
        "neutrophil",
    ]
    assert sorted(p.name for p in (demo / "matek").iterdir()) == ["BAS", "EOS", "LYT", "MON", "MYO", "NGS"]
    assert {p.name.split("_")[0] for p in (demo / "acevedo" / "neutrophil").iterdir()} == {"SNE"}
    assert Image.open(next((demo / "acevedo" / "monocyte").iterdir())).size == (360, 363)
    matek = tifffile.imread(next((demo / "matek" / "MON").iterdir()))
    assert matek.shape == (400, 400, 4) and (matek[..., 3] == 255).all()  # Matek_19 TIFFs are RGBA
    assert tifffile.imread(next((demo / "wbc1" / "DATA-VAL").iterdir())).shape == (288, 288, 3)


def test_fields_hold_one_to_three_non_overlapping_cells_and_some_background(demo):
    for domain in ("acevedo", "matek", "wbc1"):
        labels = pd.read_csv(demo / f"{domain}_fields" / "labels.csv")
        assert list(labels.columns) == ["NAME", "x1", "y1", "x2", "y2", "class"]
        assert labels.groupby("NAME").size().between(1, 3).all()
        images = sorted(p.name for p in (demo / f"{domain}_fields" / "images").iterdir())
        assert len(images) == TINY_DEMO["fields_per_domain"]
        for name, boxes in labels.groupby("NAME"):
            width, height = Image.open(demo / f"{domain}_fields" / "images" / name).size
            b = boxes[["x1", "y1", "x2", "y2"]].to_numpy()
            assert (b[:, 0] >= 0).all() and (b[:, 2] <= width).all() and (b[:, 3] <= height).all()
            for i in range(len(b)):
                for j in range(i + 1, len(b)):
                    overlap_w = min(b[i, 2], b[j, 2]) - max(b[i, 0], b[j, 0])
                    overlap_h = min(b[i, 3], b[j, 3]) - max(b[i, 1], b[j, 1])
                    assert overlap_w <= 0 or overlap_h <= 0
    all_fields = sum(len(list((demo / f"{d}_fields" / "images").iterdir())) for d in ("acevedo", "matek", "wbc1"))
    listed = sum(
        pd.read_csv(demo / f"{d}_fields" / "labels.csv")["NAME"].nunique() for d in ("acevedo", "matek", "wbc1")
    )
    assert all_fields > listed  # background fields (no white cell) exist


def test_stain_domains_differ_in_colour(demo):
    def mean_colour(paths):
        return np.mean([np.asarray(Image.open(p).convert("RGB"), dtype=float).mean(axis=(0, 1)) for p in paths], axis=0)

    acevedo = mean_colour(list((demo / "acevedo_fields" / "images").iterdir()))
    target = mean_colour(list((demo / "wbc1_fields" / "images").iterdir()))
    assert np.abs(acevedo - target).max() > 15  # grey levels: a real stain gap, not noise
