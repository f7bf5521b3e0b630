"""COCO detection json: ``bbox`` is ``[x, y, width, height]``; the category name is the label.

The dataset folder holds one ``*.json`` (or ``annotations/*.json``); ``file_name`` is relative to
``images/`` when that folder exists, else to the dataset folder. Images with no annotation are
background fields.
"""

from __future__ import annotations

import json
from pathlib import Path

from hemaflow.data.formats import Annotation, LayoutError, ReadResult, find_one, parse_box, safe_image_name

__all__ = ["read"]


def read(root: Path, subset: str | None = None) -> ReadResult:
    json_path = find_one(root, ["*.json", "annotations/*.json"], (), "COCO annotation json")
    try:
        data = json.loads(json_path.read_text())
    except json.JSONDecodeError as exc:
        raise LayoutError(f"{json_path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise LayoutError(
            f"{json_path}: not a COCO detection file (expected an object with images, annotations, categories)"
        )
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise ValueError(f"{json_path}: not a COCO detection file (no '{key}')")
    prefix = "images/" if (root / "images").is_dir() else ""
    categories = {c["id"]: c["name"] for c in data["categories"]}
    images = {}
    result = ReadResult("coco")
    for image in data["images"]:
        name = safe_image_name(str(image.get("file_name", "")))
        where = f"{json_path.name}:images[id={image.get('id')}]"
        if name is None:
            result.reject(str(image.get("file_name")), where, "unsafe_path", "file_name escapes the dataset folder")
        elif not (root / prefix / name).exists():
            result.reject(prefix + name, where, "missing_image", "listed in the json, not found")
        else:
            images[image["id"]] = prefix + name
    annotated = set()
    for ann in data["annotations"]:
        where = f"{json_path.name}:annotations[id={ann.get('id')}]"
        if ann.get("image_id") not in images:
            continue  # its image was rejected above, with the reason
        image = images[ann["image_id"]]
        try:
            x, y, w, h = (float(v) for v in ann["bbox"])
            box = parse_box(x, y, x + w, y + h)
        except (KeyError, TypeError, ValueError) as exc:
            result.reject(image, where, "invalid_box", f"bbox {ann.get('bbox')}: {exc}")
            continue
        label = categories.get(ann.get("category_id"))
        result.annotations.append(Annotation(image, box, label, where))
        annotated.add(image)
    result.background_images = sorted(set(images.values()) - annotated)
    return result
