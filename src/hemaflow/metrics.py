"""Metrics shared by the stages: pure functions over label sequences and box arrays.

Boxes are ``x1, y1, x2, y2`` arrays in one pixel frame. The CytologIA score follows the
organisers' evaluation as re-implemented by the challenge's 2nd-place team (see
``cytologia_score``).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from sklearn.metrics import balanced_accuracy_score, f1_score, precision_recall_fscore_support
from torchvision.ops import box_iou, generalized_box_iou

__all__ = ["MISSED", "Boxes", "best_giou_matches", "classification_metrics", "cytologia_box_term", "cytologia_score"]

Boxes = np.ndarray  # (N, 4) float
MISSED = "(missed)"  # the predicted class of a true box no prediction matched


def classification_metrics(truth: Sequence[str], predicted: Sequence[str]) -> dict:
    """Macro-F1 (over the classes present in ``truth``), balanced accuracy, accuracy, per-class P/R/F1.

    Averaging over the true classes is the challenges' convention: a class the model predicts but
    the data never holds only costs precision elsewhere, it does not add a zero to the mean.
    """
    labels = sorted(set(truth))
    if not labels:
        raise ValueError("no ground truth to score")
    with warnings.catch_warnings():  # predicted labels outside the truth (a missed box) are expected here
        warnings.simplefilter("ignore", UserWarning)
        precision, recall, f1, support = precision_recall_fscore_support(truth, predicted, labels=labels, zero_division=0)
        macro_f1 = f1_score(truth, predicted, labels=labels, average="macro", zero_division=0)
        balanced_accuracy = balanced_accuracy_score(truth, predicted)
    return {
        "macro_f1": float(macro_f1),
        "balanced_accuracy": float(balanced_accuracy),
        "accuracy": float(sum(t == p for t, p in zip(truth, predicted, strict=True)) / len(truth)),
        "per_class": {
            label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for label, p, r, f, s in zip(labels, precision, recall, f1, support, strict=True)
        },
    }


def _pairwise(fn, truth: Boxes, predicted: Boxes) -> np.ndarray:
    if len(truth) == 0 or len(predicted) == 0:
        return np.zeros((len(truth), len(predicted)))
    return fn(torch.as_tensor(truth, dtype=torch.float64), torch.as_tensor(predicted, dtype=torch.float64)).numpy()


def best_giou_matches(truth: Boxes, predicted: Boxes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each true box: the index of the prediction with the highest GIoU (-1: none), its GIoU and IoU.

    Row-wise argmax after removing duplicate predictions, as the CytologIA evaluation does (not
    a one-to-one Hungarian matching: two true boxes may pick the same prediction).
    """
    predicted = np.unique(np.asarray(predicted, dtype=np.float64).reshape(-1, 4), axis=0)
    giou = _pairwise(generalized_box_iou, truth, predicted)
    iou = _pairwise(box_iou, truth, predicted)
    if giou.shape[1] == 0:
        return np.full(len(truth), -1), np.full(len(truth), -1.0), np.zeros(len(truth))
    best = giou.argmax(1)
    rows = np.arange(len(truth))
    return best, giou[rows, best], iou[rows, best]


def cytologia_box_term(pairs: list[tuple[Boxes, Boxes]]) -> float:
    """Mean over every true box of (best GIoU + 1) / 2; a true box with no prediction scores 0."""
    scores = []
    for truth, predicted in pairs:
        best, giou, _ = best_giou_matches(truth, predicted)
        scores += [0.0 if b < 0 else (g + 1) / 2 for b, g in zip(best, giou, strict=True)]
    return float(np.mean(scores)) if scores else float("nan")


def cytologia_score(
    truth: Mapping[str, tuple[Boxes, Sequence[str]]], predicted: Mapping[str, tuple[Boxes, Sequence[str]]]
) -> dict:
    """The CytologIA challenge score over images: 0.2 x mean rescaled GIoU + 0.8 x macro-F1.

    Per image, each true box takes the predicted box with the highest GIoU (``best_giou_matches``:
    predictions de-duplicated, row-wise argmax, no one-to-one assignment) and that box's class;
    rescaled GIoU = (GIoU + 1) / 2. A true box with no prediction in its image scores 0 and
    counts as the wrong class (``MISSED``). Macro-F1 is over the true boxes' classes. Extra
    predicted boxes cost nothing here, as in the challenge; detection precision is in AP.
    Returns the score, its two terms, the mean GIoU of the true boxes that have a match, the
    per-box (true, predicted) class pairs and ``classification_metrics``.
    """
    actual, chosen, rescaled, matched_giou = [], [], [], []
    empty: tuple[Boxes, Sequence[str]] = (np.zeros((0, 4)), [])
    for name, (boxes, classes) in truth.items():
        pred_boxes, pred_classes = predicted.get(name, empty)
        pred_boxes = np.asarray(pred_boxes, dtype=np.float64).reshape(-1, 4)
        unique, first = np.unique(pred_boxes, axis=0, return_index=True)
        best, giou, _ = best_giou_matches(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), unique)
        for label, b, g in zip(classes, best, giou, strict=True):
            actual.append(label)
            chosen.append(MISSED if b < 0 else pred_classes[first[b]])
            rescaled.append(0.0 if b < 0 else (g + 1) / 2)
            if b >= 0:
                matched_giou.append(g)
    if not actual:
        raise ValueError("no true boxes to score")
    scores = classification_metrics(actual, chosen)
    box_term = float(np.mean(rescaled))
    return {
        "score": 0.2 * box_term + 0.8 * scores["macro_f1"],
        "box_term": box_term,
        "mean_giou": float(np.mean(matched_giou)) if matched_giou else None,
        "missed_boxes": sum(c == MISSED for c in chosen),
        "true_boxes": len(actual),
        "matches": list(zip(actual, chosen, strict=True)),
        "classification": scores,
    }
