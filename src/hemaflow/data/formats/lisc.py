"""LISC (Rezatofighi and Soltanian-Zadeh 2011): 720x576 BMP smear fields, one white cell each, in class folders.

The release keeps the images in one folder per class (``Baso``, ``eosi``, ``lymp``, ``mono``,
``neut``, and ``mixt`` for fields with several cells) and the expert's segmentation of each cell
in a ``Ground Truth`` tree of the same folders and file names. A cell's box is the bounding box of
its mask's non-black pixels; without a mask its position is unknown and the image is rejected,
since a whole 720x576 field is no cell crop. ``mixt`` fields are left out (several cells, one
label). Folder names are matched by their first four letters, in any case; the reader takes the
release's top folder (with the images in ``Main Dataset/`` or at the top) and finds the tree whose
name starts with ``Ground Truth``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from hemaflow.data.formats import Annotation, LayoutError, ReadResult, list_images
from hemaflow.data.formats.segmentation_wbc import mask_box

__all__ = ["read"]

CLASSES = {"baso": "Baso", "eosi": "eosi", "lymp": "lymp", "mono": "mono", "neut": "neut"}


def _class_dirs(folder: Path) -> dict[str, Path]:
    return {
        p.name[:4].lower(): p
        for p in sorted(folder.iterdir())
        if p.is_dir() and p.name[:4].lower() in {*CLASSES, "mixt"}
    }


def read(root: Path, subset: str | None = None) -> ReadResult:
    main = root / "Main Dataset" if (root / "Main Dataset").is_dir() else root
    classes = _class_dirs(main)
    if not set(CLASSES) & set(classes):
        found = ", ".join(p.name for p in sorted(main.iterdir()) if p.is_dir()) or "none"
        raise LayoutError(f"{main}: expected LISC class folders (Baso, eosi, lymp, mono, neut, mixt), found {found}")
    truth_roots = sorted(p for p in root.rglob("*") if p.is_dir() and p.name.lower().startswith("ground truth"))
    masks = _class_dirs(truth_roots[0]) if truth_roots else {}
    result = ReadResult("lisc")
    for key, folder in classes.items():
        for name in list_images(folder):
            relative = folder.relative_to(root).as_posix() + "/" + name
            if key == "mixt":
                result.reject(
                    relative, relative, "several_cells", "a LISC 'mixt' field holds several cells under one label"
                )
                continue
            candidates = sorted(masks[key].glob(f"**/{Path(name).stem}.*")) if key in masks else []
            if not candidates:
                result.reject(
                    relative, relative, "missing_mask", "no ground-truth mask: the cell's position is unknown"
                )
                continue
            with Image.open(candidates[0]) as mask:
                box = mask_box(np.asarray(mask.convert("L")) > 0)
            if box is None:
                result.reject(relative, candidates[0].name, "empty_mask", "the mask marks no cell")
                continue
            result.annotations.append(Annotation(relative, box, CLASSES[key], relative))
    return result
