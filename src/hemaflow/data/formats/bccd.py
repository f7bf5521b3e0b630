"""BCCD in Pascal VOC layout: ``JPEGImages/``, ``Annotations/*.xml``, ``ImageSets/Main/*.txt``.

Only ``WBC`` objects are read (RBC and platelet boxes are not white cells). ``labels.csv`` gives
the white-cell subtype per *image*, not per box: a label is attached to a box only when that is
unambiguous (every WBC box of the image gets the same label); otherwise the boxes are kept for
detection, unlabelled, and each is listed in the report.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from hemaflow.data.formats import Annotation, Finding, ReadResult, parse_box, read_table, safe_image_name

__all__ = ["read"]


def _image_labels(path: Path) -> dict[str, list[str]]:
    if not path.exists():
        return {}
    table = read_table(path, {"Image": ("Image",), "Category": ("Category", "class", "label")})
    labels = {}
    for image, category in zip(table["Image"], table["Category"], strict=True):
        if image.isdigit():
            labels[f"BloodImage_{int(image):05d}"] = [part.strip() for part in category.split(",") if part.strip()]
    return labels


def read(root: Path, subset: str | None = None) -> ReadResult:
    annotation_dir = root / "Annotations"
    if not annotation_dir.is_dir():
        raise ValueError(f"{root}: expected Pascal VOC folders Annotations/ and JPEGImages/")
    xml_files = sorted(annotation_dir.glob("*.xml"))
    if subset is not None:
        split_file = root / "ImageSets" / "Main" / f"{subset}.txt"
        if not split_file.exists():
            found = ", ".join(sorted(p.stem for p in split_file.parent.glob("*.txt"))) or "none"
            raise ValueError(f"{split_file}: no such split (found: {found})")
        keep = set(split_file.read_text().split())
        xml_files = [p for p in xml_files if p.stem in keep]
    image_labels = _image_labels(root / "labels.csv")
    result = ReadResult("bccd")
    for xml_path in xml_files:
        where = f"Annotations/{xml_path.name}"
        try:
            tree = ET.parse(xml_path).getroot()
        except ET.ParseError as exc:
            result.reject(where, where, "unreadable_annotation", f"not valid XML ({exc})")
            continue
        name = safe_image_name(tree.findtext("filename", default=f"{xml_path.stem}.jpg"))
        if name is None:
            result.reject(where, where, "unsafe_path", "<filename> escapes the dataset folder")
            continue
        image = f"JPEGImages/{name}"
        if not (root / image).exists():
            result.reject(image, where, "missing_image", "named by the annotation, not found")
            continue
        boxes = []
        for index, obj in enumerate(tree.iter("object")):
            if obj.findtext("name", "").strip().upper() != "WBC":
                continue
            bndbox = obj.find("bndbox")
            corners = [bndbox.findtext(k) if bndbox is not None else None for k in ("xmin", "ymin", "xmax", "ymax")]
            try:
                boxes.append((parse_box(*corners), f"{where}#object{index}"))
            except ValueError as exc:
                result.reject(image, f"{where}#object{index}", "invalid_box", str(exc))
        if not boxes:
            result.background_images.append(image)
            continue
        labels = image_labels.get(xml_path.stem, [])
        label = labels[0] if labels and len(set(labels)) == 1 else None
        for box, row in boxes:
            result.annotations.append(Annotation(image, box, label, row))
            if label is None:
                why = (
                    "no label in labels.csv"
                    if not labels
                    else f"labels.csv gives {', '.join(labels)} for {len(boxes)} box(es)"
                )
                result.findings.append(Finding(image, row, "unlabelled", "ambiguous_image_label", why))
    return result
