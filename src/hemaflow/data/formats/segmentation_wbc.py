"""segmentation_WBC (Zheng et al. 2018): ``NNN.bmp`` + ``NNN.png`` mask + ``labels.csv``.

Masks hold 0 background, 128 cytoplasm, 255 nucleus; the cell's box is the bounding box of the
non-zero mask. ``labels.csv`` columns: ``image ID,class`` (1 neutrophil ... 5 basophil).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from hemaflow.data.formats import Annotation, ReadResult

__all__ = ["mask_box", "read"]


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    return float(cols.min()), float(rows.min()), float(cols.max() + 1), float(rows.max() + 1)


def read(root: Path) -> ReadResult:
    labels_path = root / "labels.csv"
    if not labels_path.exists():
        raise ValueError(f"{root}: expected NNN.bmp images, NNN.png masks and labels.csv")
    table = pd.read_csv(labels_path, dtype=str, keep_default_na=False)
    table.columns = [c.strip() for c in table.columns]
    labels = {int(r["image ID"]): r["class"].strip() or None for r in table.to_dict("records") if r["image ID"].strip()}
    result = ReadResult("segmentation_wbc")
    for image_path in sorted(root.glob("*.bmp")):
        name, mask_path = image_path.name, image_path.with_suffix(".png")
        if not mask_path.exists():
            result.reject(name, name, "missing_mask", f"no {mask_path.name} beside the image")
            continue
        box = mask_box(np.asarray(Image.open(mask_path)))
        if box is None:
            result.reject(name, mask_path.name, "empty_mask", "the mask marks no cell")
            continue
        number = int(image_path.stem) if image_path.stem.isdigit() else None
        result.annotations.append(Annotation(name, box, labels.get(number), f"labels.csv:image ID={number}"))
    return result
