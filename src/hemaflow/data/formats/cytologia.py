"""CytologIA (Trustii 2024): a flat image folder and a CSV ``NAME,x1,y1,x2,y2,class``.

Images in the folder that no CSV row names are background fields (no white cell). The test CSV
(``trustii_id,NAME``) holds no boxes and so no training data: ``hemaflow predict`` reads those.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from hemaflow.data.formats import Annotation, ReadResult, find_one, list_images, parse_box, safe_image_name

__all__ = ["read"]

BOX_COLUMNS = ["x1", "y1", "x2", "y2"]


def read(root: Path) -> ReadResult:
    csv_path = find_one(root, ["*.csv"], ("train.csv", "labels.csv"), "CSV (train.csv or labels.csv) beside the images")
    image_dir = root / "images" if (root / "images").is_dir() else root
    prefix = "images/" if image_dir != root else ""
    present = set(list_images(image_dir))
    table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    missing = [c for c in ["NAME", *BOX_COLUMNS, "class"] if c not in table.columns]
    if missing:
        raise ValueError(
            f"{csv_path}: missing column(s) {', '.join(missing)}; expected NAME,x1,y1,x2,y2,class "
            "(a test CSV without boxes is for `hemaflow predict`, not for prepare)"
        )
    result = ReadResult("cytologia")
    referenced = set()
    for index, record in enumerate(table.to_dict("records")):
        where = f"{csv_path.name}:{index + 2}"  # line in the file, header is line 1
        name = safe_image_name(record["NAME"])
        if name is None:
            result.reject(record["NAME"], where, "unsafe_path", "file name escapes the dataset folder")
            continue
        if name not in present:
            result.reject(prefix + name, where, "missing_image", "listed in the CSV, not found")
            continue
        referenced.add(name)
        try:
            box = parse_box(*(record[c] for c in BOX_COLUMNS))
        except ValueError as exc:
            result.reject(prefix + name, where, "invalid_box", str(exc))
            continue
        result.annotations.append(Annotation(prefix + name, box, record["class"] or None, where))
    result.background_images = [prefix + n for n in sorted(present - referenced)]
    return result
