"""Readers of the native dataset layouts.

A reader parses a dataset's own annotation files (folders, CSV, VOC XML, COCO json) into
:class:`Annotation` rows and :class:`Finding` rows; it never decodes images (``prepare`` does,
in parallel). Every row a reader cannot use becomes a rejected finding with the file, row and
reason; a layout it does not understand is one ``LayoutError`` line that says what it expected
and what it found. CSV files go through ``read_table``: any header spelling (case, spaces,
underscores), a byte-order mark, commas or semicolons, extra columns ignored.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pandas as pd

from hemaflow.data.images import IMAGE_SUFFIXES
from hemaflow.errors import HemaflowError
from hemaflow.params import DatasetFormat
from hemaflow.tables import Box

__all__ = [
    "Annotation",
    "Finding",
    "LayoutError",
    "ReadResult",
    "list_images",
    "parse_box",
    "read_dataset",
    "read_table",
    "safe_image_name",
]


class LayoutError(HemaflowError):
    """A dataset folder is not in the layout its format expects; the message says what was expected and found."""


@dataclass(frozen=True)
class Annotation:
    """One cell as the dataset states it."""

    image: str  # posix path relative to the dataset root
    box: Box | None  # x1, y1, x2, y2 in image pixels; None: a single-cell image (the cell is centred)
    label: str | None  # the native label; None: unlabelled
    row: str  # where it was read, for messages: "labels.csv:12", "basophil/BA_1.jpg"


@dataclass(frozen=True)
class Finding:
    """Something done to the input that a user must be able to see: nothing is changed silently."""

    file: str
    row: str
    action: str  # rejected | flagged | estimated | repaired | clipped | converted | unlabelled | derived
    reason: str  # short code, counted in metrics/data.json
    detail: str


@dataclass
class ReadResult:
    vocabulary: str | None  # the classes.yaml source vocabulary of the labels (None: unlabelled)
    annotations: list[Annotation] = field(default_factory=list)
    background_images: list[str] = field(default_factory=list)  # fields known to hold no white cell
    # one white cell per image, its box only centring the crop: a classification dataset's cells, which a
    # user classifies at their crop; as a source's they still teach the detector where a cell is
    cell_images: bool = False
    findings: list[Finding] = field(default_factory=list)

    def reject(self, file: str, row: str, reason: str, detail: str) -> None:
        self.findings.append(Finding(file, row, "rejected", reason, detail))


def safe_image_name(name: str) -> str | None:
    """A dataset-relative posix path, or None when the name could escape the dataset folder."""
    name = name.strip().replace("\\", "/")
    path = PurePosixPath(name)
    if not name or path.is_absolute() or ".." in path.parts or ":" in path.parts[0]:
        return None
    return path.as_posix()


def parse_box(x1: object, y1: object, x2: object, y2: object) -> Box:
    """Corner coordinates as floats; ValueError for a missing, non-numeric or empty box."""
    try:
        box = tuple(float(v) for v in (x1, y1, x2, y2))
    except (TypeError, ValueError):
        raise ValueError(f"non-numeric box {(x1, y1, x2, y2)}") from None
    if any(v != v for v in box):  # NaN
        raise ValueError(f"box has a missing coordinate {box}")
    if box[0] >= box[2] or box[1] >= box[3]:
        raise ValueError(f"empty box: needs x1 < x2 and y1 < y2, got {box}")
    return box  # type: ignore[return-value]


def find_one(root: Path, patterns: list[str], preferred: tuple[str, ...], what: str) -> Path:
    """The single annotation file of a dataset (a preferred name wins when several exist)."""
    candidates = sorted({p for pattern in patterns for p in root.glob(pattern)})
    for name in preferred:
        if (root / name) in candidates:
            return root / name
    if len(candidates) != 1:
        found = ", ".join(p.name for p in candidates) or "none"
        raise ValueError(f"{root}: expected exactly one {what}, found {found}")
    return candidates[0]


def list_images(root: Path) -> list[str]:
    return sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )


def _key(header: str) -> str:
    return re.sub(r"[\s_\-]+", "", header.strip().lower())


def read_table(path: Path, columns: Mapping[str, tuple[str, ...]]) -> pd.DataFrame:
    """A CSV with the wanted ``columns`` (canonical name -> accepted spellings), values as stripped strings.

    Accepts a byte-order mark, comma, semicolon or tab separators, any case and spacing of the
    headers, extra columns. LayoutError for an empty file or a missing column, naming both sides.
    """
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    wanted = ", ".join(spellings[0] for spellings in columns.values())
    if not text.strip():
        raise LayoutError(f"{path}: empty file; expected a header with {wanted}")
    try:
        separator = csv.Sniffer().sniff(text.splitlines()[0], delimiters=",;\t").delimiter
    except csv.Error:
        separator = ","
    frame = pd.read_csv(io.StringIO(text), sep=separator, dtype=str, keep_default_na=False)
    found = {_key(c): c for c in frame.columns}
    chosen, missing = {}, []
    for name, spellings in columns.items():
        match = next((found[_key(s)] for s in spellings if _key(s) in found), None)
        if match is None:
            missing.append(spellings[0])
        else:
            chosen[match] = name
    if missing:
        raise LayoutError(
            f"{path}: missing column(s) {', '.join(missing)}; expected {wanted}, found "
            f"{', '.join(str(c) for c in frame.columns) or 'no header'}"
        )
    return frame[list(chosen)].rename(columns=chosen).apply(lambda column: column.str.strip())


# The parts of a layout that ``subset`` may name, per format (None: the format has none).
SUBSETS: dict[DatasetFormat, str] = {
    DatasetFormat.bccd: "an official split: ImageSets/Main/<subset>.txt (train, val, test, trainval)",
    DatasetFormat.hida: "one of the challenge's datasets: Acevedo_20, Matek_19, WBC1, WBC2",
    DatasetFormat.raabin: "one of the released sets of cropped cells (Train, TestA, TestB) or a folder of smear fields",
    DatasetFormat.segmentation_wbc: "Dataset 1 or Dataset 2 of the repository's layout",
}


def read_dataset(fmt: DatasetFormat, root: Path, subset: str | None = None) -> ReadResult:
    """Read a dataset's annotations in its native layout; raise LayoutError (one line) on a wrong layout."""
    from hemaflow.data.formats import bccd, coco, cytologia, folders, lisc, raabin, segmentation_wbc

    readers: dict[DatasetFormat, Callable[[Path, str | None], ReadResult]] = {
        DatasetFormat.acevedo20: folders.read_acevedo20,
        DatasetFormat.matek19: folders.read_matek19,
        DatasetFormat.hematologist: folders.read_hematologist,
        DatasetFormat.hida: folders.read_hida,
        DatasetFormat.raabin: raabin.read,
        DatasetFormat.unlabelled: folders.read_unlabelled,
        DatasetFormat.cytologia: cytologia.read,
        DatasetFormat.bccd: bccd.read,
        DatasetFormat.coco: coco.read,
        DatasetFormat.segmentation_wbc: segmentation_wbc.read,
        DatasetFormat.lisc: lisc.read,
    }
    if not root.is_dir():
        raise LayoutError(f"{root}: dataset folder not found")
    if subset is not None and fmt not in SUBSETS:
        allowed = "; ".join(f"{f.value}: {what}" for f, what in SUBSETS.items())
        raise LayoutError(f"{root}: format {fmt.value} has no subsets ('subset' applies to {allowed})")
    try:
        return readers[fmt](root, subset)
    except (FileNotFoundError, ValueError) as exc:
        raise LayoutError(str(exc)) from None
