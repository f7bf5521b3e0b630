"""Duplicates in the input, found before they double-count cells in training and in the metrics.

- the same annotation row twice (same image, box and label): the copy is dropped and reported;
- the same image file under two names (identical bytes): reported, with the roles both copies
  play, since one copy in training and one in the test split leaks the answer;
- two boxes of one image overlapping more than ``prepare.duplicate_iou``: reported as one cell
  annotated twice (kept, since touching cells can overlap too; the report lets a person decide).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

import numpy as np

from hemaflow.data.formats import Annotation, Finding
from hemaflow.metrics import pairwise_iou

__all__ = ["drop_duplicate_rows", "near_duplicate_boxes", "same_bytes"]


def drop_duplicate_rows(annotations: Sequence[Annotation]) -> tuple[list[Annotation], list[Finding]]:
    """The annotations without exact repeats (image, box, label), and a rejected finding per repeat."""
    first: dict[tuple, Annotation] = {}
    kept, findings = [], []
    for ann in annotations:
        key = (ann.image, ann.box, ann.label)
        if ann.box is not None and key in first:
            findings.append(Finding(ann.image, ann.row, "rejected", "duplicate_row", f"the same as {first[key].row}"))
            continue
        first.setdefault(key, ann)
        kept.append(ann)
    return kept, findings


def near_duplicate_boxes(annotations: Sequence[Annotation], iou: float) -> list[Finding]:
    """A flagged finding for each pair of boxes of one image that overlap more than ``iou``."""
    by_image: dict[str, list[Annotation]] = defaultdict(list)
    for ann in annotations:
        if ann.box is not None:
            by_image[ann.image].append(ann)
    findings = []
    for image, anns in by_image.items():
        if len(anns) < 2:
            continue
        overlap = pairwise_iou(np.array([a.box for a in anns]), np.array([a.box for a in anns]))
        for i, j in zip(*np.nonzero(np.triu(overlap, k=1) > iou), strict=True):
            detail = f"IoU {overlap[i, j]:.2f} with {anns[j].row} ({anns[i].label} / {anns[j].label})"
            findings.append(Finding(image, anns[i].row, "flagged", "near_duplicate_box", detail))
    return findings


def same_bytes(files: Iterable[tuple[str, str, str]]) -> list[Finding]:
    """(name, role, sha256) per image -> a flagged finding for every image whose bytes another name also holds."""
    groups: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for name, role, digest in files:
        groups[digest].append((name, role))
    findings = []
    for copies in groups.values():
        if len(copies) < 2:
            continue
        roles = sorted({role for _, role in copies})
        leak = " - a test image is also a training image" if "test" in roles and "source" in roles else ""
        for name in dict.fromkeys(n for n, _ in copies):
            others = ", ".join(dict.fromkeys(n for n, _ in copies if n != name))
            if not others and not leak:  # one file that several datasets read by design (parts of a folder)
                continue
            detail = f"same bytes as {others}" if others else "one file read by several datasets"
            findings.append(
                Finding(name, name, "flagged", "duplicate_image", f"{detail} (roles: {', '.join(roles)}){leak}")
            )
    return findings
