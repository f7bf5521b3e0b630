"""The ``detect`` stage and ``hemaflow detect``: boxes on original images, as CSV, with metrics."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from hemaflow._io import write_csv, write_json
from hemaflow.data.images import ImageRejected, load_rgb
from hemaflow.detect.metrics import detection_metrics
from hemaflow.detect.predict import Detector
from hemaflow.params import DetectParams

__all__ = ["BOX_COLUMNS", "detect_images", "detect_splits"]

BOX_COLUMNS = ["image", "x1", "y1", "x2", "y2", "score"]
SPLITS = ("train", "val", "test", "target")  # train, val: training crops (classify/crops.py); test: evaluation
# Smear regions far larger than a single-cell image are the point of tiling; still refuse what
# would not fit in memory decoded (400 Mpx x 3 bytes = 1.2 GB).
MAX_FIELD_PIXELS = 400_000_000


def _detect(detector: Detector, path: Path, px_per_um: float, params: DetectParams) -> tuple[np.ndarray, np.ndarray]:
    rgb, _, _ = load_rgb(path, MAX_FIELD_PIXELS)
    boxes, scores = detector(rgb, px_per_um, params.tile_overlap, params.batch_size)
    height, width = rgb.shape[:2]
    boxes = np.clip(boxes, 0, [width, height, width, height])
    return boxes, scores


def _rows(image: str, boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[dict]:
    keep = scores >= threshold
    return [
        {"image": image, "x1": round(b[0], 2), "y1": round(b[1], 2), "x2": round(b[2], 2), "y2": round(b[3], 2),
         "score": round(float(s), 4)}
        for b, s in zip(boxes[keep], scores[keep], strict=True)
    ]  # fmt: skip


def detect_splits(
    params: DetectParams, fields_px_per_um: float, prepared: Path, model_dir: Path, out: Path, metrics: Path
) -> None:
    """Detect on the original fields of every split; CSVs and metrics/detect.json."""
    detector = Detector.load(model_dir, fields_px_per_um, params.device)
    images = pd.read_csv(prepared / "images.csv", keep_default_na=False)
    cells = pd.read_csv(prepared / "cells.csv", keep_default_na=False)
    result: dict = {"arch": params.model.arch, "input_px": params.input_px}
    for split in SPLITS:
        chosen = images[(images["split"] == split) & (images["field"] != "")]
        rows, truth, predictions = [], {}, {}
        for image in tqdm(chosen.itertuples(), total=len(chosen), desc=f"detect {split}", unit="field"):
            boxes, scores = _detect(detector, Path(image.image), image.px_per_um, params)
            rows += _rows(image.image, boxes, scores, params.score_threshold)
            predictions[image.image] = (boxes, scores)
            truth[image.image] = cells.loc[cells["image"] == image.image, ["x1", "y1", "x2", "y2"]].to_numpy(float)
        write_csv(out / f"{split}.csv", pd.DataFrame(rows, columns=BOX_COLUMNS))
        if sum(len(t) for t in truth.values()):
            result[split] = detection_metrics(truth, predictions, params.score_threshold) | {"fields": len(chosen)}
    write_json(metrics, result)


def detect_images(
    paths: Sequence[Path], params: DetectParams, fields_px_per_um: float, model_dir: Path, px_per_um: float
) -> pd.DataFrame:
    """Boxes above the score threshold for each image (original pixels); unreadable images are skipped and named."""
    detector = Detector.load(model_dir, fields_px_per_um, params.device)
    rows, errors = [], []
    for path in tqdm(paths, desc="detect", unit="image"):
        try:
            boxes, scores = _detect(detector, path, px_per_um, params)
        except ImageRejected as exc:
            errors.append(f"{path}: {exc.reason}: {exc}")
            continue
        rows += _rows(str(path), boxes, scores, params.score_threshold)
    for error in errors:
        print(f"skipped {error}")
    return pd.DataFrame(rows, columns=BOX_COLUMNS)
