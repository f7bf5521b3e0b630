"""The ``detect`` stage: boxes on the original fields of every split, as CSV, with metrics.

``<out>/<split>.csv`` (``DETECTION_COLUMNS``, original-image pixels, boxes at or above the score
threshold) for train and val (the ``crop`` stage cuts training crops around them), test (the
``evaluate`` stage classifies them) and target. ``metrics`` holds COCO AP, precision, recall,
mean GIoU and the CytologIA box term per split. When the data holds no smear field the pipeline
trains no detector; the CSVs are then empty and the metrics say why.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from hemaflow._io import write_csv, write_json
from hemaflow.data.images import MAX_FIELD_PIXELS, load_rgb
from hemaflow.detect.detector import DetectorEnsemble, NoDetector, score_threshold
from hemaflow.detect.metrics import ap50, detection_metrics
from hemaflow.metrics import across_seeds
from hemaflow.params import DetectParams, EvaluateParams, PredictParams
from hemaflow.tables import BOX, DETECTION_COLUMNS, DETECTIONS_CARD, field_boxes, read_cells, read_images

__all__ = ["SPLITS", "detect", "detection_rows"]

SPLITS = ("train", "val", "test", "target")


def detection_rows(image: str, found: np.ndarray, scores: np.ndarray) -> list[dict]:
    return [
        {"image": image, **{k: round(float(v), 2) for k, v in zip(BOX, box, strict=True)}, "score": round(float(s), 4)}
        for box, s in zip(found, scores, strict=True)
    ]


def detect(
    *,
    params: DetectParams,
    predict: PredictParams,
    evaluation: EvaluateParams,
    seed: int,
    prepared: Path,
    model: Path,
    out: Path,
    metrics: Path,
) -> None:
    """Detect on every split's fields; write the CSVs and ``metrics``."""
    images, cells = read_images(prepared), read_cells(prepared)
    members = [(model, 1.0), *((Path(m.path), m.weight) for m in predict.extra_detectors)]
    try:
        ensemble = DetectorEnsemble.load(
            members, predict.wbf_iou, params.tile_overlap, predict.batch_size, params.device
        )
    except NoDetector as reason:
        for split in SPLITS:
            write_csv(out / f"{split}.csv", pd.DataFrame(columns=DETECTION_COLUMNS))
        write_json(out / DETECTIONS_CARD, {"detector": "none", "reason": str(reason)})
        write_json(metrics, {"detector": "none", "reason": str(reason)})
        return
    threshold = score_threshold(params, ensemble)
    result: dict = {
        "detector": type(ensemble.detectors[0].model).__name__,
        "score_threshold": threshold,
        "threshold_from": "validation fields" if params.score_threshold == "auto" else "detect.score_threshold",
    }
    write_json(out / DETECTIONS_CARD, {"detector": result["detector"], "score_threshold": threshold})
    for split in SPLITS:
        chosen = images[(images["split"] == split) & (images["field"] != "")]
        truth = field_boxes(chosen, cells)
        predictions = _predict(ensemble, chosen, split)
        rows = [
            r for image, (found, s) in predictions.items() for r in detection_rows(image, *_above(found, s, threshold))
        ]
        write_csv(out / f"{split}.csv", pd.DataFrame(rows, columns=DETECTION_COLUMNS))
        if sum(len(t) for t in truth.values()):
            scores = detection_metrics(truth, predictions, threshold, evaluation.bootstrap, evaluation.confidence, seed)
            result[split] = scores | {"fields": len(chosen)}
    if "test" in result:
        alone = not predict.extra_detectors  # then the test AP50 above is the first seed's own
        first = {ensemble.detectors[0].seed: result["test"]["AP50"]} if alone else {}
        result["seeds"] = _spread(first, model, images, cells, params, predict)
    write_json(metrics, result)


def _above(found: np.ndarray, scores: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    keep = scores >= threshold
    return found[keep], scores[keep]


def _predict(ensemble: DetectorEnsemble, fields: pd.DataFrame, split: str) -> dict:
    """Every box and score (unthresholded) on each field, keyed by image name."""
    return {
        image.image: ensemble(load_rgb(Path(image.image), MAX_FIELD_PIXELS)[0], image.px_per_um)
        for image in tqdm(fields.itertuples(), total=len(fields), desc=f"detect {split}", unit="field")
    }


def _spread(
    known: dict[int, float],
    model: Path,
    images: pd.DataFrame,
    cells: pd.DataFrame,
    params: DetectParams,
    predict: PredictParams,
) -> dict:
    """Test AP50 of each training seed's detector alone (``known``: those already measured): mean and
    standard deviation across seeds."""
    fields = images[(images["split"] == "test") & (images["field"] != "")]
    truth = field_boxes(fields, cells)
    folders = [model, *sorted((model / "seeds").glob("seed*"), key=lambda f: int(f.name[4:]))]
    scores = dict(known)
    for folder in folders:
        detector = DetectorEnsemble.load(
            [(folder, 1.0)], predict.wbf_iou, params.tile_overlap, predict.batch_size, params.device
        )
        member = detector.detectors[0].seed
        if member not in scores:
            scores[member] = ap50(truth, _predict(detector, fields, f"test, seed {member}"))
    return {"test_AP50": across_seeds(scores)}
