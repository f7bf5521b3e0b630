"""The ``prepare`` stage: ingest, validate and repair, unify classes, normalise scale, split.

Outputs (under ``out``, replaced atomically):

- ``cells.csv``: one row per cell: ``cell_id, image, x1, y1, x2, y2, fine_class, coarse_class,
  source_label, dataset, domain, role, fold, split, px_per_um, crop`` (boxes in original-image
  pixels, empty for single-cell images whose cell is centred; ``crop`` relative to ``out``)
- ``images.csv``: one row per accepted image, with its size, split and (for smear fields) the
  rescaled field used by the detector
- ``crops/<cell_id>.png``: the cell at ``crop.fov_um`` resampled to ``crop.pixels``
- ``fields/<dataset>/*.png`` + ``coco/{train,val,test,target}.json``: smear fields at
  ``fields.px_per_um``, single category ``wbc`` (train and val: the source's fields, and those of
  a target with ``detector_boxes``)
- ``findings.csv``: every rejected, repaired, clipped, converted or unlabelled file or row
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import zlib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from hemaflow._io import atomic_dir, write_csv
from hemaflow.data.backgrounds import erase_cells
from hemaflow.data.calibrate import ScaleEstimate, estimate_px_per_um
from hemaflow.data.classes import ClassMatrix, load_class_matrix
from hemaflow.data.duplicates import drop_duplicate_rows, near_duplicate_boxes, same_bytes
from hemaflow.data.folds import assign_folds
from hemaflow.data.formats import Annotation, Finding, LayoutError, read_dataset
from hemaflow.data.images import ImageRejected, load_rgb
from hemaflow.data.report import write_data_metrics
from hemaflow.data.scale import clip_box, crop_cell, rescale, rescale_box
from hemaflow.errors import HemaflowError
from hemaflow.params import DatasetParams, PrepareParams, Role
from hemaflow.tables import CELL_COLUMNS, IMAGE_KEY, Box, field_boxes, on_images, read_crop, write_cells

__all__ = ["prepare"]


@dataclass(frozen=True)
class _Cell:
    box: Box | None
    label: str | None
    fine: str | None
    row: str


@dataclass(frozen=True)
class _ImageJob:
    dataset: DatasetParams
    path: Path  # where to read it
    name: str  # relative to the dataset folder, for findings and field names
    image: str  # as written to cells.csv: the path as given under prepare.root
    index: int  # position within its dataset: part of the cell ids
    cells: tuple[_Cell, ...]
    is_field: bool  # a smear field (boxes) rather than a single-cell image
    cell_image: bool  # the reader's images are single cells (``ReadResult.cell_images``)


def _fine_class(dataset: DatasetParams, vocabulary: dict[str, str | None], label: str) -> tuple[bool, str | None]:
    """(known, fine class or None when deliberately dropped)."""
    if label in dataset.label_map:
        return True, dataset.label_map[label]
    if label in vocabulary:
        return True, vocabulary[label]
    return False, None


def _estimated(dataset: DatasetParams, estimate: ScaleEstimate) -> tuple[DatasetParams, dict, Finding]:
    """``px_per_um: auto`` resolved by the red-cell estimate of the dataset's folder."""
    low, high = estimate.spread
    record = {
        "px_per_um": estimate.px_per_um,
        "spread": [low, high],
        "red_cells": estimate.red_cells,
        "images": estimate.images,
        "method": estimate.method,
    }
    detail = (
        f"{estimate.px_per_um:.3f} px/um (interquartile {low:.3f}-{high:.3f}) from {estimate.red_cells} red cells "
        f"in {estimate.images} images: {estimate.method}"
    )
    finding = Finding(dataset.name, "px_per_um", "estimated", "px_per_um_auto", detail)
    return dataset.model_copy(update={"px_per_um": estimate.px_per_um}), record, finding


def _position(name: str) -> float:
    """A fixed pseudo-random position in [0, 1) for an image name (``DatasetParams.part``)."""
    return zlib.crc32(name.encode()) / 2**32


def _collect_jobs(
    params: PrepareParams, matrix: ClassMatrix, seed: int
) -> tuple[list[_ImageJob], list[Finding], dict[str, dict]]:
    root = Path(params.root)
    jobs: list[_ImageJob] = []
    findings: list[Finding] = []
    scales: dict[str, dict] = {}
    # one estimate per folder: the parts of one folder (target, labelled slice, test) are one lab's camera
    folder_scales: dict[tuple[str, str | None], ScaleEstimate] = {}
    unknown: dict[tuple[str, str], list[str]] = defaultdict(list)
    for dataset in params.datasets:
        for label, fine in dataset.label_map.items():
            if fine is not None and fine not in matrix.coarse_of:
                raise HemaflowError(
                    f"params: prepare.datasets[{dataset.name}].label_map.{label} = {fine!r} is not a fine class; "
                    f"known: {', '.join(matrix.fine_classes)}"
                )
        try:
            result = read_dataset(dataset.format, root / dataset.path, dataset.subset)
        except LayoutError as exc:
            raise LayoutError(f"dataset {dataset.name!r} ({dataset.format.value}): {exc}") from None
        annotations, repeats = drop_duplicate_rows(result.annotations)
        result.findings += repeats + near_duplicate_boxes(annotations, params.duplicate_iou)
        vocabulary = matrix.vocabulary(result.vocabulary) if result.vocabulary else {}
        findings += [_prefixed(f, dataset) for f in result.findings]
        by_image: dict[str, list[_Cell]] = defaultdict(list)
        for ann in annotations:
            by_image.setdefault(ann.image, [])
            cell = _map_label(ann, dataset, vocabulary, unknown, findings)
            if cell is not None:
                by_image[ann.image].append(cell)
        for name in result.background_images:
            by_image.setdefault(name, [])
        if dataset.px_per_um == "auto":
            folder = (dataset.path, dataset.subset)
            if folder not in folder_scales:
                try:
                    folder_scales[folder] = estimate_px_per_um(
                        [root / dataset.path / n for n in sorted(by_image)], seed=seed
                    )
                except ValueError as exc:
                    raise HemaflowError(
                        f"dataset {dataset.name!r}: px_per_um auto: {exc}; give its px_per_um instead"
                    ) from None
            dataset, scales[dataset.name], finding = _estimated(dataset, folder_scales[folder])
            findings.append(finding)
        if dataset.part is not None:
            by_image = {n: cells for n, cells in by_image.items() if dataset.part[0] <= _position(n) < dataset.part[1]}
        boxed = any(a.box is not None for a in annotations) or bool(result.background_images)
        # a single-cell image is a field only as detector training data: a target's or test's is classified at its crop
        is_field = boxed and (not result.cell_images or dataset.role is Role.source or dataset.detector_boxes)
        for index, name in enumerate(sorted(by_image)):
            image = (Path(params.root) / dataset.path / name).as_posix()
            jobs.append(
                _ImageJob(
                    dataset,
                    root / dataset.path / name,
                    name,
                    image,
                    index,
                    tuple(by_image[name]),
                    is_field,
                    result.cell_images,
                )
            )
    if unknown:
        lines = [
            f"{dataset}: {label!r} ({len(rows)} rows, first {rows[0]})"
            for (dataset, label), rows in sorted(unknown.items())
        ]
        raise HemaflowError(
            "unknown class labels: " + "; ".join(lines) + ". Map them in the dataset's label_map in params.yaml "
            "(a fine class, or null to drop) or in src/hemaflow/data/classes.yaml. "
            f"Known fine classes: {', '.join(matrix.fine_classes)}"
        )
    return jobs, findings, scales


def _prefixed(finding: Finding, dataset: DatasetParams) -> Finding:
    return Finding(f"{dataset.name}/{finding.file}", finding.row, finding.action, finding.reason, finding.detail)


def _map_label(
    ann: Annotation,
    dataset: DatasetParams,
    vocabulary: dict[str, str | None],
    unknown: dict[tuple[str, str], list[str]],
    findings: list[Finding],
) -> _Cell | None:
    if ann.label is None or dataset.role is Role.target:  # a target domain is unlabelled by definition
        return _Cell(ann.box, None, None, ann.row)
    known, fine = _fine_class(dataset, vocabulary, ann.label)
    if not known:
        unknown[(dataset.name, ann.label)].append(f"{dataset.name}/{ann.row}")
        return None
    if fine is None:
        findings.append(
            Finding(
                f"{dataset.name}/{ann.image}", ann.row, "rejected", "dropped_label", f"label {ann.label!r} maps to null"
            )
        )
        return None
    return _Cell(ann.box, ann.label, fine, ann.row)


def _field_name(job: _ImageJob) -> str:
    stem = job.name.rsplit(".", 1)[0].replace("/", "__")
    return f"fields/{job.dataset.name}/{stem}.png"


def _process(job: _ImageJob, params: PrepareParams, out: Path) -> tuple[dict | None, list[dict], list[Finding]]:
    """Decode, repair, validate boxes, write crops (and the rescaled field) for one image.

    The image row carries the file's sha256, so that the same bytes under two names are found.
    """
    where = f"{job.dataset.name}/{job.name}"
    findings: list[Finding] = []
    try:
        rgb, converted, repaired = load_rgb(job.path, params.max_pixels)
    except ImageRejected as exc:
        lost = f"; {len(job.cells)} cell(s) dropped" if job.cells else ""
        return None, [], [Finding(where, where, "rejected", exc.reason, f"{exc}{lost}")]
    if converted:
        findings.append(Finding(where, where, "converted", "converted_to_rgb8", converted))
    if repaired:
        findings.append(Finding(where, where, "repaired", "truncated_or_corrupt", repaired))
    height, width = rgb.shape[:2]
    ppu = job.dataset.px_per_um
    cells = []
    for k, cell in enumerate(job.cells):
        box = cell.box
        if box is not None:
            try:
                box, clipped = clip_box(box, width, height, params.box_tolerance_px)
            except ValueError as exc:
                findings.append(Finding(where, cell.row, "rejected", "box_outside_image", str(exc)))
                continue
            if clipped:
                findings.append(Finding(where, cell.row, "clipped", "box_outside_image", f"{cell.box} -> {box}"))
        crop, grown = crop_cell(rgb, box, ppu, params.crop.fov_um, params.crop.pixels, params.crop.margin_px)
        cell_id = f"{job.dataset.name}-{job.index:06d}-{k}"
        Image.fromarray(crop).save(out / "crops" / f"{cell_id}.png")
        if grown:
            findings.append(
                Finding(where, cell.row, "converted", "large_cell", "field of view enlarged to fit the box")
            )
        cells.append({"cell_id": cell_id, "box": box, "cell": cell})
    image_row = {
        "width": width,
        "height": height,
        "field": "",
        "sha256": hashlib.sha256(job.path.read_bytes()).hexdigest(),
    }
    if job.is_field and len(cells) < len(job.cells):
        # A field with an unusable box would teach the detector that a cell is background.
        detail = "field kept out of the detector's data: it holds a cell whose box was rejected"
        findings.append(Finding(where, where, "rejected", "field_with_rejected_box", detail))
    elif job.is_field:
        factor = params.fields.px_per_um / ppu
        image_row["field"] = _field_name(job)
        Image.fromarray(rescale(rgb, factor)).save(out / image_row["field"])
    return image_row, cells, findings


def _run(jobs: list[_ImageJob], params: PrepareParams, out: Path) -> Iterator[tuple]:
    for dataset in {job.dataset.name for job in jobs if job.is_field}:
        (out / "fields" / dataset).mkdir(parents=True, exist_ok=True)
    (out / "crops").mkdir(parents=True, exist_ok=True)
    arguments = [(job, params, out) for job in jobs]
    progress = dict(total=len(jobs), desc="prepare", unit="image")
    if params.workers == 0:
        yield from tqdm((_process(*a) for a in arguments), **progress)
        return
    with multiprocessing.get_context("fork").Pool(params.workers) as pool:
        yield from tqdm(pool.imap(_star_process, arguments, chunksize=8), **progress)


def _star_process(arguments: tuple) -> tuple:
    return _process(*arguments)


def _coco(images: pd.DataFrame, cells: pd.DataFrame, factor_of: dict[str, float]) -> dict:
    coco_images, annotations = [], []
    boxes_by_image = cells.groupby("image")
    for image_id, row in enumerate(images.itertuples(), start=1):
        factor = factor_of[row.dataset]
        coco_images.append(
            {
                "id": image_id,
                "file_name": row.field,
                "width": max(round(row.width * factor), 1),
                "height": max(round(row.height * factor), 1),
            }
        )
        if row.image not in boxes_by_image.groups:
            continue  # a background field: no white cell
        for cell in boxes_by_image.get_group(row.image).itertuples():
            x1, y1, x2, y2 = rescale_box((cell.x1, cell.y1, cell.x2, cell.y2), factor)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                    "area": round((x2 - x1) * (y2 - y1), 2),
                    "iscrowd": 0,
                }
            )
    return {"images": coco_images, "annotations": annotations, "categories": [{"id": 1, "name": "wbc"}]}


def _derive_backgrounds(
    train: pd.DataFrame, cells: pd.DataFrame, params: PrepareParams, out: Path, factor_of: dict[str, float], seed: int
) -> tuple[pd.DataFrame, list[Finding]]:
    """Extra background fields (rows like ``train``'s) so that ``fields.min_background`` is reached."""
    with_cells = train[on_images(train, cells)]
    share = params.fields.min_background
    needed = int(np.ceil((share * len(train) - (len(train) - len(with_cells))) / (1 - share)))
    if needed <= 0 or with_cells.empty:
        return train.iloc[:0], []
    chosen = with_cells.sample(n=min(needed, len(with_cells)), random_state=seed)
    rows, findings = [], []
    truth = field_boxes(chosen, cells)
    for row in chosen.itertuples():
        found = truth[row.image] * factor_of[row.dataset]
        field = read_crop(out / row.field)
        name = row.field.replace(".png", "__background.png")
        Image.fromarray(erase_cells(field, found)).save(out / name)
        rows.append(row._asdict() | {"image": name, "field": name})
        findings.append(
            Finding(
                f"{row.dataset}/{row.image}",
                name,
                "derived",
                "background_field",
                "white cells painted out (Otsu mask + inpainting) for a training background field",
            )
        )
    return pd.DataFrame(rows).drop(columns="Index"), findings


def prepare(*, params: PrepareParams, seed: int, out: Path, metrics: Path, plots: Path) -> None:
    """Build the unified dataset from the datasets listed in ``params`` (see the module docstring)."""
    matrix = load_class_matrix()
    jobs, findings, scales = _collect_jobs(params, matrix, seed)
    resolved = {job.dataset.name: job.dataset for job in jobs}
    image_rows, cell_rows = [], []
    with atomic_dir(out) as staging:
        for job, (image_row, cells, image_findings) in zip(jobs, _run(jobs, params, staging), strict=True):
            findings += image_findings
            if image_row is None:
                continue
            dataset = job.dataset
            strata = {f"{c['cell'].fine or 'unlabelled'}@{dataset.domain_name}" for c in cells}
            image_rows.append(
                {
                    "image": job.image,
                    "dataset": dataset.name,
                    "domain": dataset.domain_name,
                    "role": dataset.role.value,
                    "px_per_um": dataset.px_per_um,
                    "cells": len(cells),
                    "strata": strata or {f"background@{dataset.domain_name}"},
                    **image_row,
                }
            )
            for c in cells:
                box = c["box"] if c["box"] is not None else (np.nan,) * 4
                cell = c["cell"]
                cell_rows.append(
                    {
                        "cell_id": c["cell_id"],
                        "image": job.image,
                        "x1": box[0],
                        "y1": box[1],
                        "x2": box[2],
                        "y2": box[3],
                        "fine_class": cell.fine or "",
                        "coarse_class": matrix.coarse_of[cell.fine] if cell.fine else "",
                        "source_label": cell.label or "",
                        "dataset": dataset.name,
                        "domain": dataset.domain_name,
                        "role": dataset.role.value,
                        "px_per_um": dataset.px_per_um,
                        "crop": f"crops/{c['cell_id']}.png",
                    }
                )
        images = pd.DataFrame(image_rows)
        if images.empty:
            raise HemaflowError("prepare: no usable image in any dataset (see the findings above)")
        images["fold"] = -1
        source = images["role"] == Role.source.value
        # the labelled target slice gets folds too: each fold model is scored on slice cells it never saw
        few_shot = images["role"] == Role.target_labelled.value
        # a target whose boxes train the detector is split into its train and val fields like a source
        target_boxes = images["dataset"].isin([name for name, d in resolved.items() if d.detector_boxes])
        try:
            for chosen in (source, few_shot, target_boxes):
                if chosen.any():
                    images.loc[chosen, "fold"] = assign_folds(list(images.loc[chosen, "strata"]), params.folds, seed)
        except ValueError as exc:
            raise HemaflowError(f"prepare: {exc}") from None
        if params.test_fold is not None:  # a fold of the labelled source held out as the test split
            held_out = source & (images["fold"] == params.test_fold)
            images.loc[held_out, "role"] = Role.test.value
            source &= ~held_out
            # a held-out single-cell image is classified at its crop, as a test dataset's is: no field
            at_crop = held_out & images["dataset"].isin({job.dataset.name for job in jobs if job.cell_image})
            for field in images.loc[at_crop & (images["field"] != ""), "field"]:
                (staging / field).unlink()
            images.loc[at_crop, "field"] = ""
        images["split"] = np.where(
            source | target_boxes, np.where(images["fold"] == params.val_fold, "val", "train"), images["role"]
        )
        images = images.drop(columns="strata")
        cells = pd.DataFrame(cell_rows, columns=[c for c in CELL_COLUMNS if c not in ("fold", "split")])
        placed = images[[*IMAGE_KEY, "role", "fold", "split"]]
        cells = cells.drop(columns="role").merge(placed, on=IMAGE_KEY, how="left", validate="many_to_one")
        cells = cells[CELL_COLUMNS]
        write_cells(staging, cells)
        write_csv(staging / "images.csv", images)
        findings += same_bytes(images[["image", "role", "sha256"]].itertuples(index=False))
        factor_of = {name: params.fields.px_per_um / d.px_per_um for name, d in resolved.items()}
        fields = images[images["field"] != ""]
        field_cells = cells[on_images(cells, fields)]
        train_fields = fields[fields["split"] == "train"]
        derived, derived_findings = _derive_backgrounds(train_fields, field_cells, params, staging, factor_of, seed)
        findings += derived_findings
        findings_frame = pd.DataFrame(
            [f.__dict__ for f in findings], columns=["file", "row", "action", "reason", "detail"]
        )
        write_csv(staging / "findings.csv", findings_frame)
        (staging / "coco").mkdir()
        for split in ("train", "val", "test", "target"):
            chosen = fields[fields["split"] == split]
            if split == "train":
                chosen = pd.concat([chosen, derived], ignore_index=True)
            coco = _coco(chosen, field_cells[on_images(field_cells, chosen)], factor_of)
            (staging / "coco" / f"{split}.json").write_text(json.dumps(coco))
    write_data_metrics(cells, images, findings_frame, matrix, scales, metrics, plots)
