"""Folder-per-class single-cell layouts (Acevedo_20, Matek_19, the HIDA challenge) and plain folders."""

from __future__ import annotations

from pathlib import Path

from hemaflow.data.classes import load_class_matrix
from hemaflow.data.formats import Annotation, ReadResult, list_images

__all__ = ["read_acevedo20", "read_hematologist", "read_matek19", "read_unlabelled"]


def _class_folders(root: Path, vocabulary: str, refine_by_prefix: bool = False) -> ReadResult:
    known = load_class_matrix().vocabulary(vocabulary) if refine_by_prefix else {}
    result = ReadResult(vocabulary)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ValueError(f"{root}: expected one sub-folder per class ({vocabulary} layout), found none")
    for folder in folders:
        for name in list_images(folder):
            relative = f"{folder.name}/{name}"
            label = folder.name
            prefix = Path(name).name.split("_", 1)[0]
            if refine_by_prefix and "_" in Path(name).name and prefix in known:
                label = prefix  # Acevedo's finer classes: ig/MY_*, neutrophil/SNE_*, ...
            result.annotations.append(Annotation(relative, None, label, relative))
    return result


def read_acevedo20(root: Path) -> ReadResult:
    return _class_folders(root, "acevedo20", refine_by_prefix=True)


def read_matek19(root: Path) -> ReadResult:
    return _class_folders(root, "matek19")


def read_hematologist(root: Path) -> ReadResult:
    return _class_folders(root, "hematologist")


def read_unlabelled(root: Path) -> ReadResult:
    images = list_images(root)
    if not images:
        raise ValueError(f"{root}: no images found (unlabelled layout: any folder tree of images)")
    return ReadResult(None, [Annotation(name, None, None, name) for name in images])
