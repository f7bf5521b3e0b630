"""Detector metrics: COCO AP (pycocotools), precision and recall at the threshold, GIoU, the CytologIA box term.

AP50 also gets a bootstrap confidence interval over fields (``hemaflow.metrics``); its point
value is pycocotools', and the resamples use ``average_precision``, which computes the same
number from per-field matches (tested against pycocotools), so a resample costs microseconds.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from hemaflow.metrics import (
    Boxes,
    average_precision,
    best_f1_threshold,
    best_giou_matches,
    bootstrap_interval,
    cytologia_box_term,
    greedy_matches,
)

__all__ = ["MAX_DETECTIONS", "ap50", "choose_threshold", "detection_metrics", "per_image_matches"]

Predictions = Mapping[str, tuple[Boxes, np.ndarray]]
MAX_DETECTIONS = 100  # per image, as COCO's AP counts them


def _coco_ap(truth: Mapping[str, Boxes], predictions: Predictions) -> dict[str, float]:
    names = sorted(truth)
    coco = {
        "images": [{"id": i + 1, "file_name": n, "width": 1, "height": 1} for i, n in enumerate(names)],
        "annotations": [
            {
                "id": k + 1,
                "image_id": i + 1,
                "category_id": 1,
                "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                "area": float((b[2] - b[0]) * (b[3] - b[1])),
                "iscrowd": 0,
            }
            for k, (i, b) in enumerate((i, b) for i, n in enumerate(names) for b in truth[n])
        ],
        "categories": [{"id": 1, "name": "wbc"}],
    }
    results = [
        {"image_id": i + 1, "category_id": 1, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "score": float(s)}
        for i, n in enumerate(names)
        for b, s in zip(*predictions[n], strict=True)
    ]
    if not results or not coco["annotations"]:
        return {"mAP": 0.0, "AP50": 0.0, "AP75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its tables
        ground = COCO()
        ground.dataset = coco
        ground.createIndex()
        evaluation = COCOeval(ground, ground.loadRes(results), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return {"mAP": float(evaluation.stats[0]), "AP50": float(evaluation.stats[1]), "AP75": float(evaluation.stats[2])}


def per_image_matches(truth: Mapping[str, Boxes], predictions: Predictions) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """Per image (in ``truth``'s sorted order): its top-100 scores, their IoU-0.5 flags, its true boxes."""
    empty = (np.zeros((0, 4)), np.zeros(0))
    out = []
    for name in sorted(truth):
        found, scores = predictions.get(name, empty)
        top = np.argsort(-np.asarray(scores), kind="stable")[:MAX_DETECTIONS]
        out.append((np.asarray(scores)[top], greedy_matches(truth[name], found[top], scores[top]), len(truth[name])))
    return out


def ap50(truth: Mapping[str, Boxes], predictions: Predictions) -> float:
    """COCO AP at IoU 0.5 over every score (equal to pycocotools' AP50; tests/test_metrics.py)."""
    return average_precision(per_image_matches(truth, predictions))


def choose_threshold(truth: Mapping[str, Boxes], predictions: Predictions) -> dict:
    """The score threshold with the best F1 at IoU 0.5 on these (validation) fields, and that F1."""
    threshold, f1 = best_f1_threshold(per_image_matches(truth, predictions))
    return {"score_threshold": threshold, "f1_50": f1, "fields": len(truth)}


def detection_metrics(
    truth: Mapping[str, Boxes],
    predictions: Predictions,
    score_threshold: float,
    resamples: int,
    confidence: float,
    seed: int,
) -> dict:
    """COCO mAP/AP50/AP75 over all scores (AP50 with its interval); at ``score_threshold``: precision and
    recall at IoU 0.5 (one-to-one matching), mean GIoU of matched boxes, the CytologIA box term.

    ``truth`` and ``predictions`` are keyed by image name; every image of ``truth`` counts, so an
    image without predictions contributes misses.
    """
    names = sorted(truth)
    empty = (np.zeros((0, 4)), np.zeros(0))
    every = {n: predictions.get(n, empty) for n in names}
    matches = per_image_matches(truth, every)
    low, high = bootstrap_interval(
        lambda rows: average_precision([matches[i] for i in rows]), names, resamples, confidence, seed
    )
    kept = {n: every[n][0][every[n][1] >= score_threshold] for n in names}
    hits = sum(int(h[s >= score_threshold].sum()) for s, h, _ in matches)
    total, predicted = sum(len(truth[n]) for n in names), sum(len(kept[n]) for n in names)
    matched_giou = []
    for name in names:
        best, giou, iou = best_giou_matches(truth[name], kept[name])
        matched_giou += list(giou[(best >= 0) & (iou >= 0.5)])
    return _coco_ap(truth, every) | {
        "AP50_interval": [low, high],
        "precision_50": hits / predicted if predicted else float("nan"),
        "recall_50": hits / total if total else float("nan"),
        "mean_giou": float(np.mean(matched_giou)) if matched_giou else 0.0,
        "cytologia_box_term": cytologia_box_term([(truth[n], kept[n]) for n in names]),
        "true_boxes": total,
        "predicted_boxes": predicted,
    }
