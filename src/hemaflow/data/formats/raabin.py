"""Raabin-WBC (Kouzehkanan et al., Sci. Rep. 2022): cropped cells in class folders, or whole smear fields.

Two parts of the release are read:

- the cropped cells, ``<set>/<Class>/*.jpg`` with sets ``Train``, ``TestA``, ``TestB`` (``subset``)
  and classes Basophil, Eosinophil, Lymphocyte, Monocyte, Neutrophil (matched in any case);
- the original smear fields, each ``<name>.jpg`` with a ``<name>.json`` beside it or anywhere in
  the same tree, as the paper describes them: ``"Cell Numbers"`` and one ``"Cell_<i>"`` object per
  white cell with its corners ``x1, y1, x2, y2`` and the two experts' labels ``Label1``, ``Label2``.
  Written from that description (no copy of the files was at hand): a JSON that does not follow it
  is a finding naming the file and key, never a traceback.

A cell whose two experts agree takes their label; one where they disagree keeps its box (it is a
white cell either way, which the detector needs) and loses its label, with a finding that names both
labels. A folder holding any ``*.json`` beside images is read as fields.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from hemaflow.data.classes import load_class_matrix
from hemaflow.data.formats import Annotation, Finding, LayoutError, ReadResult, list_images, parse_box
from hemaflow.data.formats.folders import class_folders

__all__ = ["read"]

SETS = ("Train", "TestA", "TestB")
CELL_KEY = re.compile(r"cell[\s_]*\d+", re.IGNORECASE)


def read(root: Path, subset: str | None = None) -> ReadResult:
    folder = root
    if subset is not None:
        folder = root / subset
        if not folder.is_dir():
            sets = [s for s in SETS if (root / s).is_dir()]
            raise LayoutError(f"{root}: no set {subset}/ (sets found: {', '.join(sets) or 'none'})")
    if any(folder.rglob("*.json")):
        return _fields(folder, prefix=f"{subset}/" if subset else "")
    sets = [s for s in SETS if (folder / s).is_dir()]
    if subset is None and sets:
        raise LayoutError(f"{root}: holds the sets {', '.join(sets)}: choose one with subset")
    return class_folders(folder, "raabin", prefix=f"{subset}/" if subset else "", fold_case=True)


def _fields(root: Path, prefix: str) -> ReadResult:
    result = ReadResult("raabin")
    known = {label.lower(): label for label in load_class_matrix().vocabulary("raabin")}
    by_stem: dict[str, list[str]] = {}
    for name in list_images(root):
        by_stem.setdefault(Path(name).stem, []).append(name)
    jsons = sorted(root.rglob("*.json"))
    for path in jsons:
        where = f"{prefix}{path.relative_to(root).as_posix()}"
        images = by_stem.get(path.stem, [])
        beside = [name for name in images if (root / name).parent == path.parent]
        if len(beside) == 1 or len(images) == 1:
            image = f"{prefix}{(beside or images)[0]}"
        else:
            reason = "no image" if not images else f"{len(images)} images ({', '.join(images)})"
            result.reject(where, where, "missing_image", f"{reason} named {path.stem}.* for this annotation")
            continue
        try:
            document = json.loads(path.read_bytes().decode("utf-8-sig"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            result.reject(where, where, "unreadable_annotation", f"not valid JSON ({exc})")
            continue
        if not isinstance(document, dict):
            result.reject(where, where, "unreadable_annotation", "expected an object with Cell_<i> keys")
            continue
        cells = {key: value for key, value in document.items() if CELL_KEY.fullmatch(key.strip())}
        if not cells:
            result.background_images.append(image)  # a field with no white cell (Cell Numbers: 0)
        for key, cell in cells.items():
            _cell(result, image, f"{where}#{key}", cell, known)
    if not jsons or not (result.annotations or result.background_images):
        raise LayoutError(
            f"{root}: expected Raabin-WBC smear fields (<name>.jpg with <name>.json holding Cell_<i> boxes); "
            f"found {len(jsons)} JSON file(s) and no usable cell"
        )
    return result


def _cell(result: ReadResult, image: str, row: str, cell: object, known: dict[str, str]) -> None:
    if not isinstance(cell, dict):
        result.reject(image, row, "invalid_box", f"expected an object with x1, y1, x2, y2, got {cell!r}")
        return
    fields = {key.strip().lower(): value for key, value in cell.items()}
    try:
        box = parse_box(*(fields.get(k) for k in ("x1", "y1", "x2", "y2")))
    except ValueError as exc:
        result.reject(image, row, "invalid_box", str(exc))
        return
    labels = [str(fields[k]).strip() for k in ("label1", "label2", "label") if fields.get(k) not in (None, "")]
    label = known.get(labels[0].lower(), labels[0]) if labels else None
    if len({lab.lower() for lab in labels}) > 1:
        label = None
        detail = f"the experts disagree ({' vs '.join(labels)}): the box is kept, unlabelled"
        result.findings.append(Finding(image, row, "unlabelled", "experts_disagree", detail))
    result.annotations.append(Annotation(image, box, label, row))
