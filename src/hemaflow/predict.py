"""End to end: smear images in, one row per white cell out (box + class).

The path that ``hemaflow predict`` ships and that the ``evaluate`` stage scores, so the numbers
in ``metrics/evaluate`` are the numbers of the command a user runs. It composes the stages'
public inference: detector(s) (tiled, boxes of several detectors fused by weighted box
fusion), a crop of every box at the training field of view, classifier fold ensembles with TTA
(several classifiers' probabilities averaged by weight).
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
from hemaflow.classify.predict import average_probabilities, load_ensemble, predict_crops
from hemaflow.data.images import ImageRejected, load_rgb
from hemaflow.data.scale import crop_cell
from hemaflow.detect.predict import Detector
from hemaflow.errors import HemaflowError
from hemaflow.evaluate.ensemble import fuse_boxes
from hemaflow.params import EnsembleMember, Params

__all__ = ["CellPipeline", "Prediction", "SUBMISSION_COLUMNS", "predict_folder"]

SUBMISSION_COLUMNS = ["NAME", "x1", "y1", "x2", "y2", "class", "box_score", "class_confidence", "path"]
MAX_FIELD_PIXELS = 400_000_000  # as `hemaflow detect`: tiles keep memory flat, decoding does not


@dataclass(frozen=True)
class Prediction:
    """White cells found on one image, boxes in its own pixels."""

    boxes: np.ndarray  # N x 4
    scores: np.ndarray  # detector confidence
    classes: list[str]
    confidence: np.ndarray  # probability of the chosen class


@dataclass
class CellPipeline:
    detectors: list[Detector]
    detector_weights: list[float]
    classifiers: list[list]  # fold ensembles
    classifier_weights: list[float]
    classes: list[str]
    params: Params
    device: torch.device

    @classmethod
    def load(cls, params: Params, detector: Path, classifier: Path, device: str = "auto") -> CellPipeline:
        """The stage's own detector and classifier plus the extra ensemble members in ``params.predict``."""
        detectors = [EnsembleMember(path=str(detector)), *params.predict.extra_detectors]
        classifiers = [EnsembleMember(path=str(classifier)), *params.predict.extra_classifiers]
        fields_ppu = params.prepare.fields.px_per_um
        loaded = [load_ensemble(Path(member.path)) for member in classifiers]
        class_lists = {tuple(ensemble[0][1].classes) for ensemble in loaded}
        if len(class_lists) != 1:
            raise HemaflowError(f"predict.extra_classifiers: the classifiers disagree on the class list: {sorted(class_lists)}")
        use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        return cls(
            detectors=[Detector.load(Path(m.path), fields_ppu, "cuda" if use_cuda else "cpu") for m in detectors],
            detector_weights=[m.weight for m in detectors],
            classifiers=loaded,
            classifier_weights=[m.weight for m in classifiers],
            classes=list(next(iter(class_lists))),
            params=params,
            device=torch.device("cuda" if use_cuda else "cpu"),
        )

    def __call__(self, rgb: np.ndarray, px_per_um: float) -> Prediction:
        detect, crop, predict = self.params.detect, self.params.prepare.crop, self.params.predict
        height, width = rgb.shape[:2]
        found = [detector(rgb, px_per_um, detect.tile_overlap, predict.batch_size) for detector in self.detectors]
        boxes, scores = fuse_boxes(found, self.detector_weights, width, height, predict.wbf_iou)
        keep = scores >= detect.score_threshold
        boxes, scores = boxes[keep], scores[keep]
        if len(boxes) == 0:
            return Prediction(boxes, scores, [], np.zeros(0))
        crops = [crop_cell(rgb, tuple(box), px_per_um, crop.fov_um, crop.pixels, crop.margin_px)[0] for box in boxes]
        probabilities = self.classify(crops)
        return Prediction(boxes, scores, [self.classes[i] for i in probabilities.argmax(1)], probabilities.max(1))

    def classify(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """Class probabilities of cell crops (already at the training field of view)."""
        tta, batch = self.params.classify.tta, self.params.predict.batch_size
        per_model = [predict_crops(ensemble, crops, tta, self.device, batch) for ensemble in self.classifiers]
        return average_probabilities(per_model, self.classifier_weights)


def _annotate(rgb: np.ndarray, prediction: Prediction) -> Image.Image:
    image = Image.fromarray(rgb)
    draw = ImageDraw.Draw(image)
    line = max(2, round(min(rgb.shape[:2]) / 300))
    for box, label, confidence in zip(prediction.boxes, prediction.classes, prediction.confidence, strict=True):
        draw.rectangle([float(v) for v in box], outline=(255, 0, 0), width=line)
        draw.text((float(box[0]) + 3, float(box[1]) + 2), f"{label} {confidence:.2f}", fill=(255, 0, 0))
    return image


def _rows(path: Path, name: str, prediction: Prediction) -> Iterator[list]:
    for box, label, score, confidence in zip(prediction.boxes, prediction.classes, prediction.scores,
                                             prediction.confidence, strict=True):  # fmt: skip
        yield [name, *(round(float(v), 1) for v in box), label, round(float(score), 4), round(float(confidence), 4), str(path)]


def predict_folder(
    pipeline: CellPipeline, images: Sequence[Path], px_per_um: float, out: Path, annotated: Path | None
) -> dict:
    """Write the submission CSV (one row per cell) streaming, so memory stays flat; return a summary.

    Unreadable images are skipped and named in the summary. ``NAME`` is the file name, as in the
    CytologIA submission; ``path`` keeps the full path for files with the same name.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    skipped, cells, tick = [], 0, time.perf_counter()
    try:
        with partial.open("w", newline="") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(SUBMISSION_COLUMNS)
            for path in tqdm(images, desc="predict", unit="image"):
                try:
                    rgb, _, _ = load_rgb(path, MAX_FIELD_PIXELS)
                except ImageRejected as exc:
                    skipped.append(f"{path}: {exc.reason}: {exc}")
                    continue
                prediction = pipeline(rgb, px_per_um)
                writer.writerows(_rows(path, path.name, prediction))
                cells += len(prediction.classes)
                if annotated is not None:
                    write_image(annotated / f"{path.stem}.jpg", _annotate(rgb, prediction))
        os.replace(partial, out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    seconds = time.perf_counter() - tick
    done = len(images) - len(skipped)
    return {"images": done, "cells": cells, "skipped": skipped, "seconds": seconds,
            "ms_per_image": 1000 * seconds / done if done else None}  # fmt: skip

