"""``hemaflow predict``: smear images in, one row per white cell out (box, class, review flag).

It composes the stages' public inference, the code the ``detect`` and ``evaluate`` stages run:
the detector ensemble (``detect.detector``: tiled, boxes of several detectors fused by weighted
box fusion, the threshold of ``detect``), a crop of every box at the training field of view
(``classify.inference.crops_at_boxes``), the classifier fold ensembles with TTA and calibrated
probabilities (several classifiers averaged by weight). A cell whose class confidence is below
``predict.review_below`` is flagged for a hematologist's review.
"""

from __future__ import annotations

import csv
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from hemaflow._io import write_image
from hemaflow.classify.inference import Ensemble, average_probabilities, crops_at_boxes, load_ensemble, predict_crops
from hemaflow.data.images import MAX_FIELD_PIXELS, ImageRejected, load_rgb
from hemaflow.detect.detector import DetectorEnsemble, score_threshold
from hemaflow.errors import HemaflowError
from hemaflow.params import Params
from hemaflow.runtime import select_device
from hemaflow.tables import BOX

__all__ = ["SUBMISSION_COLUMNS", "CellPipeline", "Prediction", "image_names", "predict_images"]

SUBMISSION_COLUMNS = ["NAME", *BOX, "class", "box_score", "class_confidence", "review", "path"]


@dataclass(frozen=True)
class Prediction:
    """White cells found on one image, boxes in its own pixels."""

    boxes: np.ndarray  # N x 4
    scores: np.ndarray  # detector confidence
    classes: list[str]  # empty strings when only boxes were asked for
    confidence: np.ndarray  # calibrated probability of the chosen class


@dataclass
class CellPipeline:
    detectors: DetectorEnsemble
    threshold: float
    classifiers: list[Ensemble]  # empty: boxes only
    classifier_weights: list[float]
    params: Params
    device: torch.device

    @classmethod
    def load(cls, params: Params, detector: Path, classifier: Path | None) -> CellPipeline:
        """The pipeline's detector and classifier plus the extra ensemble members in ``params.predict``.

        ``classifier`` None: boxes only.
        """
        members = [(detector, 1.0), *((Path(m.path), m.weight) for m in params.predict.extra_detectors)]
        detectors = DetectorEnsemble.load(
            members, params.predict.wbf_iou, params.detect.tile_overlap, params.predict.batch_size, params.detect.device
        )
        classifiers, weights = [], []
        if classifier is not None:
            chosen = [(classifier, 1.0), *((Path(m.path), m.weight) for m in params.predict.extra_classifiers)]
            classifiers = [load_ensemble(path) for path, _ in chosen]
            weights = [w for _, w in chosen]
            class_lists = {tuple(ensemble[0][1].classes) for ensemble in classifiers}
            if len(class_lists) != 1:
                raise HemaflowError(
                    f"predict.extra_classifiers: the classifiers disagree on the class list: {sorted(class_lists)}"
                )
        device = select_device(params.classify.device, "classify.device")
        return cls(detectors, score_threshold(params.detect, detectors), classifiers, weights, params, device)

    def __call__(self, rgb: np.ndarray, px_per_um: float) -> Prediction:
        found, scores = self.detectors(rgb, px_per_um)
        keep = scores >= self.threshold
        found, scores = found[keep], scores[keep]
        if len(found) == 0 or not self.classifiers:
            return Prediction(found, scores, [""] * len(found), np.full(len(found), np.nan))
        crops = crops_at_boxes(rgb, found, px_per_um, self.params.prepare.crop)
        tta, batch = self.params.classify.tta, self.params.predict.batch_size
        per_model = [predict_crops(ensemble, crops, tta, self.device, batch) for ensemble in self.classifiers]
        probabilities = average_probabilities(per_model, self.classifier_weights)
        classes = self.classifiers[0][0][1].classes
        return Prediction(found, scores, [classes[i] for i in probabilities.argmax(1)], probabilities.max(1))


def image_names(paths: Sequence[Path], inputs: Sequence[Path]) -> list[str]:
    """Each image's NAME: its path relative to the folder it was found in (the file name for a file given
    directly), so that ``basophil/1.bmp`` and ``neutrophil/1.bmp`` stay apart."""
    folders = [p.resolve() for p in inputs if p.is_dir()]
    names = []
    for path in paths:
        resolved = path.resolve()
        parent = next((f for f in folders if resolved.is_relative_to(f)), None)
        names.append(resolved.relative_to(parent).as_posix() if parent else path.name)
    return names


def _annotate(rgb: np.ndarray, prediction: Prediction) -> Image.Image:
    image = Image.fromarray(rgb)
    draw = ImageDraw.Draw(image)
    line = max(2, round(min(rgb.shape[:2]) / 300))
    for box, label, confidence in zip(prediction.boxes, prediction.classes, prediction.confidence, strict=True):
        draw.rectangle([float(v) for v in box], outline=(255, 0, 0), width=line)
        text = f"{label} {confidence:.2f}" if label else ""
        draw.text((float(box[0]) + 3, float(box[1]) + 2), text, fill=(255, 0, 0))
    return image


def _rows(path: Path, name: str, prediction: Prediction, review_below: float) -> Iterator[list]:
    for box, label, score, confidence in zip(
        prediction.boxes, prediction.classes, prediction.scores, prediction.confidence, strict=True
    ):
        review = bool(label) and confidence < review_below
        yield [
            name,
            *(round(float(v), 1) for v in box),
            label,
            round(float(score), 4),
            "" if np.isnan(confidence) else round(float(confidence), 4),
            "review" if review else "",
            str(path),
        ]


def predict_images(
    pipeline: CellPipeline,
    images: Sequence[Path],
    names: Sequence[str],
    px_per_um: float,
    out: Path,
    annotated: Path | None,
) -> dict:
    """Write the CSV (one row per cell) streaming, so memory stays flat; return a summary.

    Unreadable images are skipped and named in the summary.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    skipped, cells, flagged, tick = [], 0, 0, time.perf_counter()
    review_below = pipeline.params.predict.review_below
    try:
        with partial.open("w", newline="") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(SUBMISSION_COLUMNS)
            for path, name in tqdm(list(zip(images, names, strict=True)), desc="predict", unit="image"):
                try:
                    rgb, _, _ = load_rgb(path, MAX_FIELD_PIXELS)
                except ImageRejected as exc:
                    skipped.append(f"{path}: {exc.reason}: {exc}")
                    continue
                prediction = pipeline(rgb, px_per_um)
                rows = list(_rows(path, name, prediction, review_below))
                writer.writerows(rows)
                cells += len(rows)
                flagged += sum(row[8] == "review" for row in rows)
                if annotated is not None:
                    write_image(annotated / f"{Path(name).with_suffix('')}.jpg", _annotate(rgb, prediction))
        os.replace(partial, out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    seconds = time.perf_counter() - tick
    done = len(images) - len(skipped)
    return {
        "images": done,
        "cells": cells,
        "review": flagged,
        "skipped": skipped,
        "seconds": seconds,
        "ms_per_image": 1000 * seconds / done if done else None,
    }
