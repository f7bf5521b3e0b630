"""segmentation_WBC (Zheng et al., Micron 2018; github.com/zxaoyou/segmentation_WBC): ``NNN.bmp`` + ``NNN.png`` mask.

The repository holds ``Dataset 1/`` (300 images, 120x120, Jiangxi Tecom) and ``Dataset 2/`` (100
images, 300x300, CellaVision blog), with the class labels at its top as ``Class Labels of Dataset
1.csv`` (header ``image ID,class label``) and ``Class Labels of Dataset 2.csv`` (``image ID,class``).
The reader takes either the repository's top folder with ``subset: Dataset 1`` / ``Dataset 2``, or
one dataset's folder whose labels CSV sits inside it or beside it. Masks hold 0 background, 128
cytoplasm, 255 nucleus; the cell's box is the bounding box of the non-zero mask. Classes 1-5:
neutrophil, lymphocyte, monocyte, eosinophil, basophil. The images are single-cell crops
(``ReadResult.cell_images``): a test or target image is classified at its cell's crop, not through
the detector; a source's boxes still train it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from hemaflow.data.formats import Annotation, LayoutError, ReadResult, read_table

__all__ = ["mask_box", "read"]

COLUMNS = {"image": ("image ID", "image", "id", "image_id"), "label": ("class", "class label", "label")}


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    return float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1)


def _labels_csv(folder: Path) -> Path:
    """The labels CSV of a dataset folder: inside it, or the repository's ``Class Labels of <folder>.csv`` beside it."""
    inside = sorted(folder.glob("*.csv"))
    beside = folder.parent / f"Class Labels of {folder.name}.csv"
    if len(inside) == 1:
        return inside[0]
    if beside.exists():
        return beside
    found = ", ".join(p.name for p in inside) or "none"
    raise LayoutError(
        f"{folder}: expected one labels CSV (labels.csv, or '{beside.name}' beside the folder); found {found}"
    )


def read(root: Path, subset: str | None = None) -> ReadResult:
    folder, prefix = root, ""
    if subset is not None:
        folder, prefix = root / subset, f"{subset}/"
        if not folder.is_dir():
            found = ", ".join(p.name for p in sorted(root.iterdir()) if p.is_dir()) or "none"
            raise LayoutError(f"{root}: no folder {subset}/ (found: {found})")
    elif not list(root.glob("*.bmp")) and (root / "Dataset 1").is_dir():
        raise LayoutError(f"{root}: the repository's top folder: choose subset: Dataset 1 or Dataset 2")
    images = sorted(folder.glob("*.bmp"))
    if not images:
        raise LayoutError(f"{folder}: expected NNN.bmp images with NNN.png masks and a labels CSV, found no .bmp")
    table = read_table(_labels_csv(folder), COLUMNS)
    labels = {int(i): label or None for i, label in zip(table["image"], table["label"], strict=True) if i.isdigit()}
    result = ReadResult("segmentation_wbc", cell_images=True)
    for image_path in images:
        name, mask_path = image_path.name, image_path.with_suffix(".png")
        if not mask_path.exists():
            result.reject(prefix + name, name, "missing_mask", f"no {mask_path.name} beside the image")
            continue
        with Image.open(mask_path) as mask:
            box = mask_box(np.asarray(mask))
        if box is None:
            result.reject(prefix + name, mask_path.name, "empty_mask", "the mask marks no cell")
            continue
        number = int(image_path.stem) if image_path.stem.isdigit() else None
        result.annotations.append(Annotation(prefix + name, box, labels.get(number), f"labels:image ID={number}"))
    return result
