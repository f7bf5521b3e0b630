"""Box ensembling across detectors: weighted box fusion (ensemble-boxes)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from ensemble_boxes import weighted_boxes_fusion

__all__ = ["fuse_boxes"]


def fuse_boxes(
    predictions: Sequence[tuple[np.ndarray, np.ndarray]],
    weights: Sequence[float],
    width: int,
    height: int,
    iou_threshold: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Fuse several detectors' (boxes, scores) on one image into one set by weighted box fusion.

    Boxes are in image pixels. A cell that only some detectors find keeps a score lowered in
    proportion (WBF's ``avg`` confidence), so the score threshold then acts as a soft vote.
    """
    if len(predictions) != len(weights):
        raise ValueError(f"{len(predictions)} detectors but {len(weights)} weights")
    if len(predictions) == 1:
        return predictions[0]
    scale = np.array([width, height, width, height], dtype=np.float64)
    boxes, scores, _ = weighted_boxes_fusion(
        [np.clip(np.asarray(b, dtype=np.float64).reshape(-1, 4) / scale, 0, 1).tolist() for b, _ in predictions],
        [np.asarray(s, dtype=np.float64).tolist() for _, s in predictions],
        [[0] * len(s) for _, s in predictions],
        weights=list(weights),
        iou_thr=iou_threshold,
        skip_box_thr=0.0,
    )
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * scale, np.asarray(scores, dtype=np.float64)
