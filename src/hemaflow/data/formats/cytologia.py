"""CytologIA (Trustii 2024): a flat image folder and a CSV ``NAME,x1,y1,x2,y2,class``.

Images in the folder that no CSV row names are background fields (no white cell). The test CSV
(``trustii_id,NAME``) holds no boxes and so no training data: ``hemaflow predict`` reads those.
"""

from __future__ import annotations

from pathlib import Path

from hemaflow.data.formats import (
    Annotation,
    LayoutError,
    ReadResult,
    find_one,
    list_images,
    parse_box,
    read_table,
    safe_image_name,
)
from hemaflow.tables import BOX

__all__ = ["read"]


COLUMNS = {
    "NAME": ("NAME", "image", "file_name", "filename", "file"),
    "x1": ("x1", "xmin"),
    "y1": ("y1", "ymin"),
    "x2": ("x2", "xmax"),
    "y2": ("y2", "ymax"),
    "class": ("class", "label", "category"),
}


def read(root: Path, subset: str | None = None) -> ReadResult:
    csv_path = find_one(root, ["*.csv"], ("train.csv", "labels.csv"), "CSV (train.csv or labels.csv) beside the images")
    image_dir = root / "images" if (root / "images").is_dir() else root
    prefix = "images/" if image_dir != root else ""
    present = set(list_images(image_dir))
    try:
        table = read_table(csv_path, COLUMNS)
    except LayoutError as exc:
        raise LayoutError(f"{exc} (a test CSV without boxes is for `hemaflow predict`, not for prepare)") from None
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
            box = parse_box(*(record[c] for c in BOX))
        except ValueError as exc:
            result.reject(prefix + name, where, "invalid_box", str(exc))
            continue
        result.annotations.append(Annotation(prefix + name, box, record["class"] or None, where))
    result.background_images = [prefix + n for n in sorted(present - referenced)]
    return result
