"""Detector metrics: COCO AP (pycocotools), recall, mean GIoU of matches, the CytologIA box term."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from hemaflow.metrics import Boxes, best_giou_matches, cytologia_box_term

__all__ = ["detection_metrics"]


def _coco_ap(coco_truth: dict, predictions: Mapping[str, tuple[Boxes, np.ndarray]]) -> dict[str, float]:
    results = []
    ids = {image["file_name"]: image["id"] for image in coco_truth["images"]}
    for name, (boxes, scores) in predictions.items():
        for (x1, y1, x2, y2), score in zip(boxes, scores, strict=True):
            results.append({"image_id": ids[name], "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})
    if not results or not coco_truth["annotations"]:
        return {"mAP": 0.0, "AP50": 0.0, "AP75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its tables
        truth = COCO()
        truth.dataset = coco_truth
        truth.createIndex()
        evaluation = COCOeval(truth, truth.loadRes(results), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return {"mAP": float(evaluation.stats[0]), "AP50": float(evaluation.stats[1]), "AP75": float(evaluation.stats[2])}


def detection_metrics(
    truth: Mapping[str, Boxes], predictions: Mapping[str, tuple[Boxes, np.ndarray]], score_threshold: float
) -> dict[str, float]:
    """COCO AP over all scores; recall, matched GIoU and the CytologIA term above ``score_threshold``.

    ``truth`` and ``predictions`` are keyed by image name; every image of ``truth`` counts, so an
    image without predictions contributes misses.
    """
    names = sorted(truth)
    coco = {
        "images": [{"id": i + 1, "file_name": n, "width": 1, "height": 1} for i, n in enumerate(names)],
        "annotations": [
            {"id": k + 1, "image_id": i + 1, "category_id": 1, "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
             "area": float((b[2] - b[0]) * (b[3] - b[1])), "iscrowd": 0}
            for k, (i, b) in enumerate((i, b) for i, n in enumerate(names) for b in truth[n])
        ],
        "categories": [{"id": 1, "name": "wbc"}],
    }  # fmt: skip
    empty = (np.zeros((0, 4)), np.zeros(0))
    ap = _coco_ap(coco, {n: predictions.get(n, empty) for n in names})
    kept = {n: predictions.get(n, empty)[0][predictions.get(n, empty)[1] >= score_threshold] for n in names}
    matched_giou, hits, total = [], 0, 0
    for name in names:
        best, giou, iou = best_giou_matches(truth[name], kept[name])
        hit = (best >= 0) & (iou >= 0.5)
        hits += int(hit.sum())
        total += len(best)
        matched_giou += list(giou[hit])
    return ap | {
        "recall_50": hits / total if total else float("nan"),
        "mean_giou": float(np.mean(matched_giou)) if matched_giou else 0.0,
        "cytologia_box_term": cytologia_box_term([(truth[n], kept[n]) for n in names]),
        "true_boxes": total,
        "predicted_boxes": int(sum(len(kept[n]) for n in names)),
    }
