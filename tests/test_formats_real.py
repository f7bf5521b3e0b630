"""Importers against the real public datasets in ../shared/data (skipped when absent)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pandas as pd
from PIL import Image

from conftest import shared_dataset
from hemaflow.data.classes import load_class_matrix
from hemaflow.data.formats import read_dataset
from hemaflow.data.formats.segmentation_wbc import mask_box
from hemaflow.params import DatasetFormat
from hemaflow.tables import read_images

ACEVEDO = {"format": "acevedo20", "path": "acevedo20_subset", "role": "source", "px_per_um": 10.0}


def _prepared_cells(tmp_path, datasets: list[dict], **prepare_params):
    """``prepare`` (5 folds, and ``prepare_params``) on these datasets of ../shared/data; its cells table."""
    from conftest import load
    from hemaflow.data.prepare import prepare

    root = shared_dataset("acevedo20_subset").parent
    params = load({"prepare": {"root": str(root), "folds": 5, "datasets": datasets, **prepare_params}}).prepare
    prepare(params=params, seed=0, out=tmp_path / "prepared", metrics=tmp_path / "data.json", plots=tmp_path / "plots")
    return pd.read_csv(tmp_path / "prepared" / "cells.csv", keep_default_na=False)


def test_acevedo20_subset_counts_and_prefix_classes():
    root = shared_dataset("acevedo20_subset")
    result = read_dataset(DatasetFormat.acevedo20, root)
    assert len(result.annotations) == 1200 and not result.findings  # 8 folders x 150 images
    vocabulary = load_class_matrix().vocabulary("acevedo20")
    fine = Counter(vocabulary[a.label] for a in result.annotations)
    assert fine == {
        "basophil": 150,
        "eosinophil": 150,
        "erythroblast": 150,
        "lymphocyte_typical": 150,
        "monocyte": 150,
        "platelet": 150,
        "metamyelocyte": 54,
        "myelocyte": 63,
        "promyelocyte": 22,
        "immature_granulocyte": 11,
        "neutrophil_banded": 73,
        "neutrophil_segmented": 74,
        "neutrophil": 3,
    }
    assert all(a.box is None for a in result.annotations)  # single centred cells


def test_bccd_wbc_boxes_match_the_xml():
    root = shared_dataset("bccd")
    result = read_dataset(DatasetFormat.bccd, root)
    assert len(result.annotations) == 372  # 344 images x 1 WBC + 14 images x 2
    assert len(result.background_images) == 6
    first = [a for a in result.annotations if a.image == "JPEGImages/BloodImage_00000.jpg"]
    assert [a.box for a in first] == [(260.0, 177.0, 491.0, 376.0)]
    assert first[0].label == "NEUTROPHIL"
    unlabelled = [f for f in result.findings if f.action == "unlabelled"]
    assert {a.label for a in result.annotations} - {None} <= set(load_class_matrix().vocabulary("bccd"))
    assert len(unlabelled) == sum(a.label is None for a in result.annotations) > 0  # blank and mixed rows, listed


def test_bccd_official_split():
    root = shared_dataset("bccd")
    train = read_dataset(DatasetFormat.bccd, root, subset="train")
    test = read_dataset(DatasetFormat.bccd, root, subset="test")
    train_images = {a.image for a in train.annotations} | set(train.background_images)
    test_images = {a.image for a in test.annotations} | set(test.background_images)
    assert (len(train_images), len(test_images)) == (205, 72)
    assert not train_images & test_images


def test_cellavision_masks_give_boxes_and_labels():
    root = shared_dataset("cellavision_blog")
    result = read_dataset(DatasetFormat.segmentation_wbc, root)
    assert len(result.annotations) == 100 and result.cell_images  # single-cell crops: boxes from masks
    assert Counter(a.label for a in result.annotations) == {"2": 37, "1": 33, "3": 15, "4": 12, "5": 3}
    mask = np.asarray(Image.open(root / "001.png"))
    assert set(np.unique(mask)) <= {0, 128, 255}
    x1, y1, x2, y2 = result.annotations[0].box
    assert (x1, y1, x2, y2) == mask_box(mask)
    assert mask[int(y1) : int(y2), int(x1) : int(x2)].astype(bool).sum() == mask.astype(bool).sum()


def test_prepare_on_real_datasets_end_to_end(tmp_path):
    shared_dataset("bccd"), shared_dataset("cellavision_blog")
    blog = {"format": "segmentation_wbc", "path": "cellavision_blog", "px_per_um": 10.0, "domain": "cellavision"}
    cells = _prepared_cells(
        tmp_path,
        [
            {"name": "pbc", **ACEVEDO},
            {"name": "bccd_test", "format": "bccd", "path": "bccd", "subset": "test", "role": "test", "px_per_um": 8.0},
            {"name": "cellavision_train", "part": [0.0, 0.3], "role": "source", **blog},
            {"name": "cellavision", "part": [0.3, 1.0], "role": "test", **blog},
        ],
    )
    counts = Counter(cells["dataset"])
    assert counts["pbc"] == 1200 and counts["bccd_test"] == 71  # BCCD test split: 72 images, 71 WBC boxes, 4 without
    assert counts["cellavision_train"] + counts["cellavision"] == 100
    pbc = cells[cells["dataset"] == "pbc"]
    assert set(pbc["fold"]) == set(range(5))
    per_fold = pbc.groupby("fold").size()
    assert per_fold.max() - per_fold.min() <= 2  # 1200 single cells, 240 per fold
    # the blog's single-cell crops teach the detector as a source's, but tested they are classified at
    # their crop: the detector's test set holds BCCD's fields only
    coco = {s: json.loads((tmp_path / "prepared" / "coco" / f"{s}.json").read_text()) for s in ("train", "val", "test")}
    assert len(coco["test"]["annotations"]) == 71 and len(coco["test"]["images"]) == 72
    taught = len(coco["train"]["annotations"]) + len(coco["val"]["annotations"])
    assert taught == counts["cellavision_train"]  # Acevedo_20's single cells carry no box
    images = pd.read_csv(tmp_path / "prepared" / "images.csv", keep_default_na=False)
    assert (images.loc[images["dataset"] == "cellavision", "field"] == "").all()
    metrics = json.loads((tmp_path / "data.json").read_text())
    assert metrics["rejected"] == 0


def _bccd_detector_target(tmp_path, target: dict):
    """``_prepared_cells`` of a small Acevedo_20 source, BCCD (``target``) as an unlabelled target whose
    boxes train the detector, and BCCD's official test subset as the test split."""
    shared_dataset("bccd")
    bccd = {"format": "bccd", "path": "bccd", "px_per_um": 12.3, "domain": "bccd"}
    return _prepared_cells(
        tmp_path,
        [
            {"name": "pbc", "part": [0.0, 0.05], **ACEVEDO},
            {"name": "bccd", "role": "target", "detector_boxes": True, **target, **bccd},
            {"name": "bccd_test", "subset": "test", "role": "test", **bccd},
        ],
    )


def test_one_folder_as_unlabelled_target_few_shot_slice_and_test_keeps_each_cell_once_per_role(tmp_path):
    shared_dataset("cellavision_blog")
    blog = {"format": "segmentation_wbc", "path": "cellavision_blog", "px_per_um": "auto", "domain": "cellavision"}
    cells = _prepared_cells(
        tmp_path,
        [
            {"name": "source", **ACEVEDO},
            {"name": "blog", "role": "target", **blog},
            {"name": "blog_slice", "role": "target_labelled", "part": [0.0, 0.3], **blog},
            {"name": "blog_test", "role": "test", "part": [0.3, 1.0], **blog},
        ],
    )
    blog_cells = cells[cells["domain"] == "cellavision"]
    assert blog_cells.groupby("dataset")["role"].agg(set).to_dict() == {
        "blog": {"target"},
        "blog_slice": {"target_labelled"},
        "blog_test": {"test"},
    }
    counts = blog_cells["dataset"].value_counts()
    assert counts["blog"] == 100 and counts["blog_slice"] + counts["blog_test"] == 100
    assert 20 <= counts["blog_slice"] <= 40  # about 30 %
    sliced = set(cells.loc[cells["dataset"] == "blog_slice", "image"])
    assert not sliced & set(cells.loc[cells["dataset"] == "blog_test", "image"])  # disjoint parts
    assert (blog_cells.loc[blog_cells["role"] == "target", "fine_class"] == "").all()  # the target stays unlabelled
    assert set(cells.loc[cells["role"] == "target_labelled", "fold"]) <= set(range(5))
    # one camera, one scale: the folder is estimated once, whichever part of it a dataset keeps
    scales = json.loads((tmp_path / "data.json").read_text())["estimated_scale"]
    assert scales["blog"] == scales["blog_slice"] == scales["blog_test"]
    assert scales["blog"]["images"] == 100  # the whole folder


def test_a_target_with_detector_boxes_trains_the_detector_on_its_boxes_and_keeps_its_cells_unlabelled(tmp_path):
    cells = _bccd_detector_target(tmp_path, {"subset": "trainval"})
    target = cells[cells["dataset"] == "bccd"]
    assert set(target["role"]) == {"target"} and set(target["fine_class"]) == {""}  # no class reaches training
    assert set(target["split"]) == {"train", "val"}
    coco = {
        s: json.loads((tmp_path / "prepared" / "coco" / f"{s}.json").read_text()) for s in ("train", "val", "target")
    }
    real_boxes = sum(1 for a in coco["train"]["annotations"] + coco["val"]["annotations"])
    assert real_boxes == len(
        target
    )  # every trainval WBC box trains or validates the detector (derived backgrounds add none)
    assert len(coco["val"]["images"]) > 0 and coco["target"]["images"] == []
    test = json.loads((tmp_path / "prepared" / "coco" / "test.json").read_text())
    assert len(test["annotations"]) == 71  # the test split is never a training field


def test_a_file_that_is_a_target_field_and_a_test_field_carries_its_boxes_once_in_each(tmp_path):
    # BCCD's whole folder as the detector-box target and its test subset as the test split: the test
    # files are fields of both datasets, and each dataset's fields must carry that dataset's boxes only
    cells = _bccd_detector_target(tmp_path, {})  # the whole folder
    test_files = set(cells.loc[cells["dataset"] == "bccd_test", "image"])
    assert test_files <= set(cells.loc[cells["dataset"] == "bccd", "image"])  # the same files in both
    coco = {s: json.loads((tmp_path / "prepared" / "coco" / f"{s}.json").read_text()) for s in ("train", "val", "test")}
    assert len(coco["test"]["annotations"]) == (cells["dataset"] == "bccd_test").sum() == 71
    assert len(coco["train"]["annotations"]) + len(coco["val"]["annotations"]) == (cells["dataset"] == "bccd").sum()


def test_held_out_single_cell_source_images_are_classified_at_their_crop_not_as_fields(tmp_path):
    # the blog as a labelled source with a fold held out as the test split: its training images
    # teach the detector, its held-out ones are scored at their crop as a test dataset's would be
    shared_dataset("cellavision_blog")
    blog = {"format": "segmentation_wbc", "path": "cellavision_blog", "px_per_um": "auto"}
    _prepared_cells(tmp_path, [{"name": "blog", "role": "source", **blog}], test_fold=4)
    prepared = tmp_path / "prepared"
    images = read_images(prepared)
    held_out = images[images["role"] == "test"]
    assert 10 <= len(held_out) <= 30 and (held_out["field"] == "").all()
    assert (images.loc[images["role"] == "source", "field"] != "").all()
    test = json.loads((prepared / "coco" / "test.json").read_text())
    assert test["images"] == [] and test["annotations"] == []
    on_disk = {f.relative_to(prepared).as_posix() for f in (prepared / "fields").rglob("*.png")}
    derived = {f for f in on_disk if f.endswith("__background.png")}  # cells painted out: training backgrounds
    assert on_disk - derived == set(images.loc[images["field"] != "", "field"])  # no held-out field left behind
