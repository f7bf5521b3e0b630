"""Every reader against its layout and malformed variants of it: a correct import or one line that says
what was expected and what was found. Never a traceback."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from hemaflow.data.duplicates import drop_duplicate_rows, near_duplicate_boxes, same_bytes
from hemaflow.data.formats import Annotation, LayoutError, read_dataset
from hemaflow.params import DatasetFormat as F


def _image(path, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), 200, np.uint8)).save(path)


def _one_line_error(fmt, root, subset=None, match=""):
    with pytest.raises(LayoutError) as error:
        read_dataset(fmt, root, subset)
    message = str(error.value)
    assert "\n" not in message and match in message, message
    return message


# ---------------------------------------------------------------------------------------------- CytologIA

GOOD = "NAME,x1,y1,x2,y2,class\na.jpg,1,2,20,25,LY\nb.jpg,3,3,30,28,MO\n"


@pytest.mark.parametrize(
    "text",
    [
        GOOD,
        "\ufeff" + GOOD,  # a byte-order mark (Excel's UTF-8)
        GOOD.replace(",", ";"),  # semicolons (a European spreadsheet)
        "name , X1,Y1 ,x2,Y2, Class\na.jpg,1,2,20,25,LY\nb.jpg,3,3,30,28,MO\n",  # other spellings
        "id,NAME,x1,y1,x2,y2,class,comment\n1,a.jpg,1,2,20,25,LY,ok\n2,b.jpg,3,3,30,28,MO,\n",  # extra columns
        "image,xmin,ymin,xmax,ymax,label\na.jpg,1,2,20,25,LY\nb.jpg,3,3,30,28,MO\n",  # VOC-style names
    ],
    ids=["plain", "bom", "semicolons", "spellings", "extra_columns", "aliases"],
)
def test_cytologia_csv_variants_import_the_same_cells(tmp_path, text):
    for name in ("a.jpg", "b.jpg", "background.jpg"):
        _image(tmp_path / "images" / name)
    (tmp_path / "train.csv").write_text(text, encoding="utf-8")
    result = read_dataset(F.cytologia, tmp_path)
    assert [(a.image, a.box, a.label) for a in result.annotations] == [
        ("images/a.jpg", (1.0, 2.0, 20.0, 25.0), "LY"),
        ("images/b.jpg", (3.0, 3.0, 30.0, 28.0), "MO"),
    ]
    assert result.background_images == ["images/background.jpg"]


@pytest.mark.parametrize(
    "text,expected",
    [
        ("", "empty file; expected a header with NAME, x1, y1, x2, y2, class"),
        ("NAME,x1,y1,x2,class\na.jpg,1,2,3,LY\n", "missing column(s) y2"),
        ("trustii_id,NAME\n1,a.jpg\n", "a test CSV without boxes is for `hemaflow predict`"),
        ("just some words\n", "missing column(s) NAME, x1, y1, x2, y2, class"),
    ],
    ids=["empty", "missing_column", "test_csv", "not_a_table"],
)
def test_cytologia_malformed_csv_is_one_line(tmp_path, text, expected):
    _image(tmp_path / "a.jpg")
    (tmp_path / "labels.csv").write_text(text)
    assert str(tmp_path / "labels.csv") in _one_line_error(F.cytologia, tmp_path, match=expected)


def test_duplicates_rows_are_dropped_and_overlaps_and_copies_reported():
    a = Annotation("f.jpg", (0.0, 0.0, 10.0, 10.0), "LY", "labels.csv:2")
    again = Annotation("f.jpg", (0.0, 0.0, 10.0, 10.0), "LY", "labels.csv:5")
    close = Annotation("f.jpg", (0.5, 0.0, 10.0, 10.0), "MO", "labels.csv:6")
    kept, findings = drop_duplicate_rows([a, again, close])
    assert kept == [a, close]
    assert [(f.row, f.reason, f.detail) for f in findings] == [
        ("labels.csv:5", "duplicate_row", "the same as labels.csv:2")
    ]
    flagged = near_duplicate_boxes(kept, iou=0.7)
    assert [(f.row, f.reason) for f in flagged] == [("labels.csv:2", "near_duplicate_box")] and "IoU 0.95" in flagged[
        0
    ].detail
    copies = same_bytes([("x/1.jpg", "source", "h1"), ("y/9.jpg", "test", "h1"), ("x/2.jpg", "source", "h2")])
    assert [f.file for f in copies] == ["x/1.jpg", "y/9.jpg"] and "a test image is also a training image" in copies[
        0
    ].detail
    # one folder split into parts by design: nothing to flag, unless a part is tested on and another trained on
    parts = same_bytes([("b/1.bmp", "target", "h1"), ("b/1.bmp", "test", "h1"), ("b/2.bmp", "target", "h2")])
    assert parts == []
    leaked = same_bytes([("b/1.bmp", "source", "h1"), ("b/1.bmp", "test", "h1")])
    assert [f.file for f in leaked] == ["b/1.bmp"] and leaked[0].detail.startswith("one file read by several datasets")


# -------------------------------------------------------------------------------------- segmentation_WBC


def _segmentation_folder(folder, header, ids=(1, 2)):
    for number in ids:
        _image(folder / f"{number:03d}.bmp")
        mask = np.zeros((30, 40), np.uint8)
        mask[5:20, 8:30] = 128
        Image.fromarray(mask).save(folder / f"{number:03d}.png")
    return header + "".join(f"{n},{n % 5 + 1}\n" for n in ids)


@pytest.mark.parametrize("header", ["image ID,class\n", "image ID,class label\n", "\ufeffImage_ID;Class label\n"])
def test_segmentation_wbc_takes_either_dataset_header(tmp_path, header):
    text = _segmentation_folder(tmp_path, header)
    (tmp_path / "labels.csv").write_text(text.replace(",", ";") if ";" in header else text, encoding="utf-8")
    result = read_dataset(F.segmentation_wbc, tmp_path)
    assert [(a.image, a.box, a.label) for a in result.annotations] == [
        ("001.bmp", (8.0, 5.0, 30.0, 20.0), "2"),
        ("002.bmp", (8.0, 5.0, 30.0, 20.0), "3"),
    ]


def test_segmentation_wbc_repository_layout_with_subset(tmp_path):
    text = _segmentation_folder(tmp_path / "Dataset 1", "image ID,class label\n")
    (tmp_path / "Class Labels of Dataset 1.csv").write_text(text)
    result = read_dataset(F.segmentation_wbc, tmp_path, "Dataset 1")
    assert [a.image for a in result.annotations] == ["Dataset 1/001.bmp", "Dataset 1/002.bmp"]
    assert read_dataset(F.segmentation_wbc, tmp_path / "Dataset 1").annotations[0].label == "2"  # the CSV beside it
    _one_line_error(F.segmentation_wbc, tmp_path, match="choose subset: Dataset 1 or Dataset 2")
    _one_line_error(F.segmentation_wbc, tmp_path, "Dataset 2", match="no folder Dataset 2/ (found: Dataset 1)")


def test_segmentation_wbc_malformed_labels_are_one_line(tmp_path):
    _segmentation_folder(tmp_path, "")
    (tmp_path / "labels.csv").write_text("image ID,colour\n1,red\n")
    _one_line_error(
        F.segmentation_wbc, tmp_path, match="missing column(s) class; expected image ID, class, found image ID, colour"
    )
    (tmp_path / "labels.csv").write_text("")
    _one_line_error(F.segmentation_wbc, tmp_path, match="empty file")
    (tmp_path / "labels.csv").unlink()
    _one_line_error(F.segmentation_wbc, tmp_path, match="expected one labels CSV")


# ---------------------------------------------------------------------------------------- BCCD and COCO


def test_bccd_labels_variants_and_a_broken_xml(tmp_path):
    _image(tmp_path / "JPEGImages" / "BloodImage_00001.jpg")
    _image(tmp_path / "JPEGImages" / "BloodImage_00002.jpg")
    (tmp_path / "Annotations").mkdir()
    xml = "<annotation><filename>{}</filename><object><name>WBC</name><bndbox><xmin>2</xmin><ymin>3</ymin><xmax>20</xmax><ymax>25</ymax></bndbox></object></annotation>"
    (tmp_path / "Annotations" / "BloodImage_00001.xml").write_text(xml.format("BloodImage_00001.jpg"))
    (tmp_path / "Annotations" / "BloodImage_00002.xml").write_text("<annotation><filename>")
    (tmp_path / "labels.csv").write_text("\ufeff;Image;Category\n0;1;NEUTROPHIL\n", encoding="utf-8")
    result = read_dataset(F.bccd, tmp_path)
    assert [(a.image, a.box, a.label) for a in result.annotations] == [
        ("JPEGImages/BloodImage_00001.jpg", (2.0, 3.0, 20.0, 25.0), "NEUTROPHIL")
    ]
    assert [(f.file, f.reason) for f in result.findings] == [
        ("Annotations/BloodImage_00002.xml", "unreadable_annotation")
    ]
    _one_line_error(F.bccd, tmp_path, "nope", match="ImageSets/Main/nope.txt: no such split")


def test_coco_malformed_json_is_one_line(tmp_path):
    (tmp_path / "annotations.json").write_text("{not json")
    _one_line_error(F.coco, tmp_path, match="annotations.json: not valid JSON")
    (tmp_path / "annotations.json").write_text(json.dumps({"images": []}))
    _one_line_error(F.coco, tmp_path, match="not a COCO detection file (no 'annotations')")


# --------------------------------------------------------------------------------------- folder layouts


def test_the_full_pbc_release_folder_is_entered(tmp_path):
    _image(tmp_path / "PBC_dataset_normal_DIB" / "ig" / "MY_1.jpg")
    _image(tmp_path / "PBC_dataset_normal_DIB" / "basophil" / "BA_2.jpg")
    result = read_dataset(F.acevedo20, tmp_path)
    assert sorted((a.image, a.label) for a in result.annotations) == [
        ("PBC_dataset_normal_DIB/basophil/BA_2.jpg", "basophil"),
        ("PBC_dataset_normal_DIB/ig/MY_1.jpg", "MY"),
    ]


def test_the_hida_challenge_layout(tmp_path):
    _image(tmp_path / "Acevedo_20" / "basophil" / "BA_1.jpg")
    _image(tmp_path / "Matek_19" / "monocyte" / "MON_1.tiff")
    _image(tmp_path / "WBC1" / "DATA-VAL" / "1.TIF")
    _image(tmp_path / "WBC2" / "DATA-TEST" / "2.TIF")
    assert [(a.image, a.label) for a in read_dataset(F.hida, tmp_path, "Ace_20").annotations] == [
        ("Acevedo_20/basophil/BA_1.jpg", "basophil")
    ]
    assert [a.label for a in read_dataset(F.hida, tmp_path, "Matek_19").annotations] == ["monocyte"]
    assert [(a.image, a.label) for a in read_dataset(F.hida, tmp_path, "WBC2").annotations] == [
        ("WBC2/DATA-TEST/2.TIF", None)
    ]
    _one_line_error(F.hida, tmp_path, match="needs subset: Acevedo_20, Matek_19, WBC1 or WBC2")


def test_raabin_sets_and_class_folders_in_any_case(tmp_path):
    _image(tmp_path / "Train" / "Basophil" / "1.jpg")
    _image(tmp_path / "TestA" / "neutrophil" / "2.jpg")
    assert [(a.image, a.label) for a in read_dataset(F.raabin, tmp_path, "TestA").annotations] == [
        ("TestA/neutrophil/2.jpg", "Neutrophil")
    ]
    _one_line_error(F.raabin, tmp_path, match="holds the sets Train, TestA: choose one with subset")
    _one_line_error(F.raabin, tmp_path, "TestB", match="no set TestB/")


def test_raabin_smear_fields_take_their_json_boxes_and_the_experts_agreement(tmp_path):
    _image(tmp_path / "fields" / "a.jpg", (80, 60))
    _image(tmp_path / "fields" / "b.jpg", (80, 60))
    _image(tmp_path / "fields" / "c.jpg", (80, 60))
    cell = {"Label1": "neutrophil", "Label2": "Neutrophil", "x1": "10", "y1": "5", "x2": "40", "y2": "35"}
    disputed = {"Label1": "Lymphocyte", "Label2": "Monocyte", "x1": 45, "y1": 10, "x2": 70, "y2": 40}
    (tmp_path / "jsons").mkdir()
    (tmp_path / "jsons" / "a.json").write_text(json.dumps({"Cell Numbers": 2, "Cell_0": cell, "Cell_1": disputed}))
    (tmp_path / "jsons" / "b.json").write_text(json.dumps({"Cell Numbers": 1, "Cell_0": {**cell, "x2": "oops"}}))
    (tmp_path / "jsons" / "c.json").write_text("{not json")
    (tmp_path / "jsons" / "d.json").write_text(json.dumps({"Cell Numbers": 0}))
    result = read_dataset(F.raabin, tmp_path)
    assert [(a.image, a.box, a.label) for a in result.annotations] == [
        ("fields/a.jpg", (10.0, 5.0, 40.0, 35.0), "Neutrophil"),
        ("fields/a.jpg", (45.0, 10.0, 70.0, 40.0), None),
    ]
    found = {(f.row, f.reason) for f in result.findings}
    assert found == {
        ("jsons/a.json#Cell_1", "experts_disagree"),
        ("jsons/b.json#Cell_0", "invalid_box"),
        ("jsons/c.json", "unreadable_annotation"),
        ("jsons/d.json", "missing_image"),
    }
    (tmp_path / "jsons" / "a.json").write_text("[]")
    (tmp_path / "fields" / "a.jpg").unlink()
    _one_line_error(F.raabin, tmp_path, match="expected Raabin-WBC smear fields")


def test_lisc_boxes_come_from_the_ground_truth_masks(tmp_path):
    _image(tmp_path / "Main Dataset" / "Baso" / "1.bmp", (72, 58))
    _image(tmp_path / "Main Dataset" / "neut" / "2.bmp", (72, 58))
    _image(tmp_path / "Main Dataset" / "mixt" / "3.bmp", (72, 58))
    mask = np.zeros((58, 72, 3), np.uint8)
    mask[10:30, 20:41] = 255
    (tmp_path / "Ground Truth segmentation" / "Baso").mkdir(parents=True)
    Image.fromarray(mask).save(tmp_path / "Ground Truth segmentation" / "Baso" / "1.bmp")
    result = read_dataset(F.lisc, tmp_path)
    assert [(a.image, a.box, a.label) for a in result.annotations] == [
        ("Main Dataset/Baso/1.bmp", (20.0, 10.0, 41.0, 30.0), "Baso")
    ]
    assert sorted(f.reason for f in result.findings) == ["missing_mask", "several_cells"]
    _one_line_error(F.lisc, tmp_path / "Main Dataset" / "Baso", match="expected LISC class folders")


@pytest.mark.parametrize(
    "fmt",
    [
        F.acevedo20,
        F.matek19,
        F.hematologist,
        F.unlabelled,
        F.raabin,
        F.lisc,
        F.cytologia,
        F.bccd,
        F.coco,
        F.segmentation_wbc,
    ],
)
def test_an_empty_folder_is_one_line_for_every_format(tmp_path, fmt):
    _one_line_error(fmt, tmp_path, match=str(tmp_path))


def test_a_subset_where_the_format_has_none_is_one_line(tmp_path):
    _one_line_error(F.cytologia, tmp_path, "train", match="format cytologia has no subsets")
