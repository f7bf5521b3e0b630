"""Folder-per-class single-cell layouts, and plain folders of unlabelled cells.

- ``acevedo20``: Acevedo_20 / PBC, ``<class>/<PREFIX>_<n>.jpg`` with finer classes in the file-name
  prefixes (``ig/MY_``, ``neutrophil/BNE_``); the full release's top folder
  ``PBC_dataset_normal_DIB/`` is entered when the path points above it.
- ``matek19``: AML-Cytomorphology_LMU, ``<ABBR>/*.tiff`` (``BAS``, ``NGS``, ...).
- ``hematologist``: one class folder per Help-a-hematologist-out class name.
- ``hida``: the challenge's ``Datasets/`` folder; ``subset`` picks ``Acevedo_20`` or ``Matek_19``
  (class folders with the challenge's 11 names; ``Ace_20`` / ``Mat_19`` accepted) or ``WBC1`` /
  ``WBC2`` (unlabelled ``DATA-VAL`` / ``DATA-TEST``), as the MIC-DKFZ starter code reads it.
- ``unlabelled``: any folder tree of single-cell images (WBC1/WBC2 ``DATA-VAL``).
"""

from __future__ import annotations

from pathlib import Path

from hemaflow.data.classes import load_class_matrix
from hemaflow.data.formats import Annotation, LayoutError, ReadResult, list_images

__all__ = ["class_folders", "read_acevedo20", "read_hematologist", "read_hida", "read_matek19", "read_unlabelled"]

PBC_RELEASE = "PBC_dataset_normal_DIB"
HIDA_SETS = {
    "acevedo_20": "Acevedo_20",
    "ace_20": "Acevedo_20",
    "matek_19": "Matek_19",
    "mat_19": "Matek_19",
    "wbc1": "WBC1",
    "wbc2": "WBC2",
}
HIDA_UNLABELLED = {"WBC1": "DATA-VAL", "WBC2": "DATA-TEST"}


def _subfolders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def class_folders(
    root: Path, vocabulary: str, refine_by_prefix: bool = False, prefix: str = "", fold_case: bool = False
) -> ReadResult:
    """One annotation per image of every class folder; labels are the folder names (or file prefixes)."""
    known = load_class_matrix().vocabulary(vocabulary)
    by_key = {label.lower(): label for label in known} if fold_case else {label: label for label in known}
    result = ReadResult(vocabulary)
    folders = _subfolders(root)
    if not folders:
        expected = ", ".join(sorted(known)[:8])
        raise LayoutError(
            f"{root}: expected one sub-folder per class ({vocabulary} layout: {expected}, ...), found none"
        )
    for folder in folders:
        # an unknown folder name stays the label: prepare lists every unknown label and how to map it
        folder_label = by_key.get(folder.name.lower() if fold_case else folder.name, folder.name)
        for name in list_images(folder):
            relative = f"{prefix}{folder.name}/{name}"
            label = folder_label
            file_prefix = Path(name).name.split("_", 1)[0]
            if refine_by_prefix and "_" in Path(name).name and file_prefix in known:
                label = file_prefix  # Acevedo's finer classes: ig/MY_*, neutrophil/SNE_*, ...
            result.annotations.append(Annotation(relative, None, label, relative))
    if not result.annotations:
        found = ", ".join(f.name for f in folders)
        raise LayoutError(f"{root}: no images in class folders of the {vocabulary} layout (folders found: {found})")
    return result


def _no_subset(root: Path, subset: str | None, fmt: str) -> None:
    if subset is not None:
        raise LayoutError(f"{root}: format {fmt} takes no subset")


def read_acevedo20(root: Path, subset: str | None = None) -> ReadResult:
    _no_subset(root, subset, "acevedo20")
    prefix = ""
    if (root / PBC_RELEASE).is_dir() and len(_subfolders(root)) == 1:  # the path names the release's top folder
        root, prefix = root / PBC_RELEASE, f"{PBC_RELEASE}/"
    return class_folders(root, "acevedo20", refine_by_prefix=True, prefix=prefix)


def read_matek19(root: Path, subset: str | None = None) -> ReadResult:
    _no_subset(root, subset, "matek19")
    return class_folders(root, "matek19")


def read_hematologist(root: Path, subset: str | None = None) -> ReadResult:
    _no_subset(root, subset, "hematologist")
    return class_folders(root, "hematologist")


def read_unlabelled(root: Path, subset: str | None = None, prefix: str = "") -> ReadResult:
    images = list_images(root)
    if not images:
        raise LayoutError(f"{root}: no images found (unlabelled layout: any folder tree of images)")
    return ReadResult(None, [Annotation(f"{prefix}{name}", None, None, f"{prefix}{name}") for name in images])


def read_hida(root: Path, subset: str | None = None) -> ReadResult:
    """The Help-a-hematologist-out ``Datasets/`` folder; ``subset`` names the dataset to read."""
    present = ", ".join(p.name for p in _subfolders(root)) or "none"
    if subset is None or subset.lower() not in HIDA_SETS:
        raise LayoutError(
            f"{root}: the hida layout needs subset: Acevedo_20, Matek_19, WBC1 or WBC2 (folders found: {present})"
        )
    name = HIDA_SETS[subset.lower()]
    folder = root / name
    if not folder.is_dir():
        raise LayoutError(f"{root}: expected the challenge's folder {name}/ (folders found: {present})")
    if name in HIDA_UNLABELLED:
        inner = folder / HIDA_UNLABELLED[name]
        chosen, prefix = (inner, f"{name}/{inner.name}/") if inner.is_dir() else (folder, f"{name}/")
        return read_unlabelled(chosen, prefix=prefix)
    return class_folders(folder, "hematologist", prefix=f"{name}/")
