"""What ``prepare`` made of the inputs: counts per class x domain x split, findings, gaps."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from hemaflow._io import write_csv, write_figure, write_json
from hemaflow.data.classes import ClassMatrix
from hemaflow.tables import read_cells

__all__ = ["format_report", "missing_classes", "write_data_metrics"]


def missing_classes(cells: pd.DataFrame) -> dict[str, list[str]]:
    """Per domain, the fine classes that some other labelled domain has and this one lacks."""
    labelled = cells[cells["fine_class"].fillna("") != ""]
    every = set(labelled["fine_class"])
    present = labelled.groupby("domain")["fine_class"].agg(set)
    return {domain: sorted(every - classes) for domain, classes in present.items()}


def _counts(cells: pd.DataFrame) -> dict:
    labelled = cells.assign(fine_class=cells["fine_class"].fillna("").replace("", "unlabelled"))
    counts: dict = {}
    for (domain, split, fine), n in labelled.groupby(["domain", "split", "fine_class"]).size().items():
        counts.setdefault(domain, {}).setdefault(split, {})[fine] = int(n)
    return counts


def write_data_metrics(
    cells: pd.DataFrame,
    images: pd.DataFrame,
    findings: pd.DataFrame,
    matrix: ClassMatrix,
    scales: dict[str, dict],
    metrics: Path,
    plots: Path,
) -> None:
    """metrics/data.json, plots/data/class_distribution.csv and a class x domain heatmap."""
    by_action = {
        action: {reason: int(n) for reason, n in group.groupby("reason").size().items()}
        for action, group in findings.groupby("action")
    }
    gaps = missing_classes(cells)
    write_json(
        metrics,
        {
            "images": {
                "accepted": len(images),
                "background_fields": int(((images["field"] != "") & (images["cells"] == 0)).sum()),
                "by_split": {k: int(v) for k, v in images.groupby("split").size().items()},
            },
            "cells": {
                "total": len(cells),
                "labelled": int((cells["fine_class"].fillna("") != "").sum()),
                "by_split": {k: int(v) for k, v in cells.groupby("split").size().items()},
            },
            "findings": by_action,
            "rejected": int((findings["action"] == "rejected").sum()),
            "counts": _counts(cells),
            "missing_classes": {domain: len(classes) for domain, classes in gaps.items()},
            "duplicates": {
                reason: int((findings["reason"] == reason).sum())
                for reason in ("duplicate_row", "duplicate_image", "near_duplicate_box")
            },
            "estimated_scale": scales,
        },
    )
    labelled = cells[cells["fine_class"].fillna("") != ""]
    table = labelled.groupby(["fine_class", "domain"]).size().rename("cells").reset_index()
    table["class_domain"] = table["fine_class"] + " @ " + table["domain"]
    plots.mkdir(parents=True, exist_ok=True)
    write_csv(plots / "class_distribution.csv", table[["class_domain", "fine_class", "domain", "cells"]])
    _heatmap(labelled, matrix, plots / "class_by_domain.png")


def _heatmap(labelled: pd.DataFrame, matrix: ClassMatrix, path: Path) -> None:
    grid = pd.crosstab(labelled["fine_class"], labelled["domain"])
    grid = grid.reindex([c for c in matrix.fine_classes if c in grid.index])
    fig = Figure(figsize=(1.6 + 1.2 * max(len(grid.columns), 1), 1.2 + 0.35 * max(len(grid), 1)))
    ax = fig.subplots()
    ax.imshow(grid.to_numpy(), cmap="Blues", aspect="auto")
    ax.set_xticks(range(len(grid.columns)), grid.columns, rotation=30, ha="right")
    ax.set_yticks(range(len(grid.index)), grid.index)
    for (i, j), n in pd.DataFrame(grid.to_numpy()).stack().items():
        ax.text(
            j,
            i,
            str(n),
            ha="center",
            va="center",
            fontsize=8,
            color="black" if n < grid.to_numpy().max() / 2 else "white",
        )
    ax.set_title("labelled cells per fine class and domain")
    fig.tight_layout()
    write_figure(path, fig)


def format_report(prepared: Path, limit: int = 50) -> str:
    """A human-readable summary of a prepared folder: counts, gaps and every finding (up to limit)."""
    cells = read_cells(prepared)
    findings = pd.read_csv(prepared / "findings.csv", keep_default_na=False)
    lines = ["Cells per fine class x domain x split", ""]
    labelled = cells.assign(fine_class=cells["fine_class"].replace("", "(unlabelled)"))
    pivot = pd.crosstab(
        labelled["fine_class"], [labelled["domain"], labelled["split"]], margins=True, margins_name="all"
    )
    lines += [pivot.to_string(), ""]
    for domain, classes in missing_classes(cells.replace("", None)).items():
        if classes:
            lines.append(f"domain {domain} lacks: {', '.join(classes)}")
    lines += ["", f"Findings: {len(findings)} (all in {prepared / 'findings.csv'})"]
    if not findings.empty:
        lines.append(findings.groupby(["action", "reason"]).size().rename("rows").to_string())
        order = {
            "rejected": 0,
            "flagged": 1,
            "estimated": 2,
            "repaired": 3,
            "clipped": 4,
            "unlabelled": 5,
            "converted": 6,
            "derived": 7,
        }
        ranked = findings.assign(rank=findings["action"].map(order)).sort_values("rank", kind="stable")
        lines.append("")
        lines += [
            f"  {r.action:<10} {r.file} [{r.row}] {r.reason}: {r.detail}" for r in ranked.head(limit).itertuples()
        ]
        if len(ranked) > limit:
            lines.append(f"  ... {len(ranked) - limit} more")
    return "\n".join(lines)
