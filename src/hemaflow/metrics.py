"""Metrics shared by the stages: pure functions over label sequences, box arrays and probabilities.

Boxes are ``x1, y1, x2, y2`` arrays in one pixel frame. The CytologIA score follows the
organisers' evaluation as re-implemented by the challenge's 2nd-place team (see
``cytologia_score``). Confidence intervals are percentile bootstraps over test *images*: the
cells of one image are resampled together (``bootstrap_interval``), since cells of one smear
are not independent.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

__all__ = [
    "MISSED",
    "SPREAD_KEYS",
    "Boxes",
    "across_seeds",
    "average_precision",
    "best_f1_threshold",
    "best_giou_matches",
    "bootstrap_interval",
    "classification_metrics",
    "cytologia_box_term",
    "cytologia_score",
    "expected_calibration_error",
    "greedy_matches",
    "label_scores",
    "pairwise_iou",
]

Boxes = np.ndarray  # (N, 4) float
MISSED = "(missed)"  # the predicted class of a true box no prediction matched


def classification_metrics(truth: Sequence[str], predicted: Sequence[str]) -> dict:
    """Macro-F1 (over the classes present in ``truth``), balanced accuracy, accuracy, per-class P/R/F1.

    Averaging over the true classes is the challenges' convention: a class the model predicts but
    the data never holds only costs precision elsewhere, it does not add a zero to the mean. The
    numbers are scikit-learn's (``zero_division=0``; tested against it), computed from the confusion
    matrix so that this module needs nothing but numpy.
    """
    labels = sorted(set(truth))
    if not labels:
        raise ValueError("no ground truth to score")
    codes = {label: i for i, label in enumerate(sorted(set(truth) | set(predicted)))}
    t = np.array([codes[x] for x in truth])
    p = np.array([codes[x] for x in predicted])
    confusion = np.bincount(t * len(codes) + p, minlength=len(codes) ** 2).reshape(len(codes), len(codes))
    per_class = {}
    for label in labels:
        i = codes[label]
        tp, support, chosen = int(confusion[i, i]), int(confusion[i].sum()), int(confusion[:, i].sum())
        precision = tp / chosen if chosen else 0.0
        recall = tp / support
        f1 = 2 * tp / (support + chosen) if support + chosen else 0.0
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    return {
        "macro_f1": float(np.mean([c["f1"] for c in per_class.values()])),
        "balanced_accuracy": float(np.mean([c["recall"] for c in per_class.values()])),
        "accuracy": float((t == p).mean()),
        "per_class": per_class,
    }


def _overlaps(first: Boxes, second: Boxes) -> tuple[np.ndarray, np.ndarray]:
    """IoU and generalized IoU of every box of ``first`` with every box of ``second``."""
    a = np.asarray(first, np.float64).reshape(-1, 4)[:, None, :]
    b = np.asarray(second, np.float64).reshape(-1, 4)[None, :, :]
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    overlap = np.clip(np.minimum(a[..., 2:], b[..., 2:]) - np.maximum(a[..., :2], b[..., :2]), 0, None).prod(-1)
    union = area_a + area_b - overlap
    iou = overlap / union
    enclosing = (np.maximum(a[..., 2:], b[..., 2:]) - np.minimum(a[..., :2], b[..., :2])).prod(-1)
    return iou, iou - (enclosing - union) / enclosing


def pairwise_iou(first: Boxes, second: Boxes) -> np.ndarray:
    """IoU of every box of ``first`` with every box of ``second`` (len(first) x len(second))."""
    return _overlaps(first, second)[0]


def best_giou_matches(truth: Boxes, predicted: Boxes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each true box: the index of the prediction with the highest GIoU (-1: none), its GIoU and IoU.

    Row-wise argmax after removing duplicate predictions, as the CytologIA evaluation does (not
    a one-to-one Hungarian matching: two true boxes may pick the same prediction).
    """
    predicted = np.unique(np.asarray(predicted, dtype=np.float64).reshape(-1, 4), axis=0)
    iou, giou = _overlaps(truth, predicted)
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


def greedy_matches(truth: Boxes, predicted: Boxes, scores: np.ndarray, iou_threshold: float = 0.5) -> np.ndarray:
    """COCO's matching on one image: by falling score, each prediction takes the unmatched true box
    of highest IoU at or above the threshold. Returns a true-positive flag per prediction, in score order.
    """
    order = np.argsort(-np.asarray(scores), kind="stable")
    iou = pairwise_iou(np.asarray(predicted, dtype=np.float64).reshape(-1, 4)[order], truth)
    taken = np.zeros(len(truth), dtype=bool)
    hits = np.zeros(len(order), dtype=bool)
    for k in range(len(order)):
        candidates = np.where(~taken & (iou[k] >= iou_threshold), iou[k], -1.0) if len(truth) else np.zeros(0)
        if len(candidates) and candidates.max() >= 0:
            taken[candidates.argmax()] = hits[k] = True
    return hits


def _pooled(per_image: Sequence[tuple[np.ndarray, np.ndarray, int]]) -> tuple[np.ndarray, np.ndarray, int]:
    scores = np.concatenate([np.sort(np.asarray(s))[::-1] for s, _, _ in per_image]) if per_image else np.zeros(0)
    hits = np.concatenate([h for _, h, _ in per_image]) if per_image else np.zeros(0, bool)
    order = np.argsort(-scores, kind="stable")
    return scores[order], hits[order], sum(n for _, _, n in per_image)


def average_precision(per_image: Sequence[tuple[np.ndarray, np.ndarray, int]]) -> float:
    """AP from per-image (scores, true-positive flags in score order, true boxes), as COCO computes
    it: precision made monotone, sampled at 101 recall points (pycocotools' AP50 for IoU 0.5 flags).
    """
    _, hits, total = _pooled(per_image)
    if total == 0:
        return float("nan")
    if len(hits) == 0:
        return 0.0
    tp = np.cumsum(hits)
    recall = tp / total
    precision = tp / np.arange(1, len(hits) + 1)
    precision = np.maximum.accumulate(precision[::-1])[::-1] if len(precision) else precision
    points = np.linspace(0, 1, 101)
    index = np.searchsorted(recall, points, side="left")
    sampled = np.where(index < len(precision), precision[np.minimum(index, len(precision) - 1)], 0.0)
    return float(sampled.mean())


def best_f1_threshold(per_image: Sequence[tuple[np.ndarray, np.ndarray, int]]) -> tuple[float, float]:
    """The score threshold with the highest F1 at the flags' IoU (the highest such threshold on ties), and that F1.

    Greedy matching runs in score order, so the matches above a threshold are the matches of the
    predictions above it: one pass over the sorted scores scores every threshold.
    """
    scores, hits, total = _pooled(per_image)
    if total == 0 or len(scores) == 0:
        return 1.0, 0.0
    tp = np.cumsum(hits)
    f1 = 2 * tp / (np.arange(1, len(hits) + 1) + total)
    last = np.r_[scores[1:] != scores[:-1], True]  # a threshold keeps every prediction of equal score
    best = np.flatnonzero(last & (f1 == f1[last].max()))[0]
    return float(scores[best]), float(f1[best])


def bootstrap_interval(
    statistic: Callable[[np.ndarray], float],
    groups: Sequence[object],
    resamples: int,
    confidence: float,
    seed: int,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(indices)`` over items, resampling whole groups.

    ``groups[i]`` is the group (test image) of item ``i``; each resample draws as many groups as
    there are, with replacement, and passes the indices of all their items to ``statistic``.
    """
    labels, members = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    by_group = [np.flatnonzero(members == g) for g in range(len(labels))]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        drawn = rng.integers(0, len(by_group), len(by_group))
        values.append(statistic(np.concatenate([by_group[g] for g in drawn])))
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by the bins' sizes."""
    confidence, correct = np.asarray(confidence, np.float64), np.asarray(correct, np.float64)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    error = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            error += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(error)


def label_scores(truth: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """Macro-F1, balanced accuracy and accuracy of integer-coded labels (the bootstrap's fast path).

    The same definitions as ``classification_metrics``: averages over the classes present in
    ``truth``; a predicted class absent from ``truth`` only costs the others precision.
    """
    truth, predicted = np.asarray(truth), np.asarray(predicted)
    size = int(max(truth.max(initial=0), predicted.max(initial=0))) + 1
    confusion = np.bincount(truth * size + predicted, minlength=size * size).reshape(size, size)
    present = np.unique(truth)
    tp = np.diag(confusion)[present].astype(np.float64)
    support = confusion.sum(1)[present]
    predicted_count = confusion.sum(0)[present]
    denominator = support + predicted_count
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    return {
        "macro_f1": float(f1.mean()),
        "balanced_accuracy": float((tp / support).mean()),
        "accuracy": float((truth == predicted).mean()),
    }


SPREAD_KEYS = ("macro_f1", "balanced_accuracy")  # the scores whose spread across training seeds is reported


def across_seeds(values: Mapping[int, float]) -> dict:
    """One score of every training seed, with their mean and sample standard deviation (None for one seed)."""
    numbers = np.array(list(values.values()), dtype=np.float64)
    return {
        "per_seed": {str(seed): float(v) for seed, v in values.items()},
        "mean": float(numbers.mean()),
        "std": float(numbers.std(ddof=1)) if len(numbers) > 1 else None,
    }
