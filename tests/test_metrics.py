"""The metrics on hand-checked inputs: CytologIA score, AP against pycocotools, grouped bootstrap
intervals, threshold choice, calibration error."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score

from hemaflow.detect.metrics import _coco_ap, choose_threshold, per_image_matches
from hemaflow.metrics import (
    MISSED,
    across_seeds,
    average_precision,
    bootstrap_interval,
    cytologia_score,
    expected_calibration_error,
    label_scores,
)


def test_cytologia_score_by_hand():
    truth = {
        "a.jpg": (np.array([[0, 0, 10, 10], [20, 20, 30, 30]]), ["LY", "MO"]),
        "b.jpg": (np.array([[0, 0, 10, 10]]), ["LY"]),
        "c.jpg": (np.array([[5, 5, 15, 15]]), ["MO"]),  # nothing predicted here
    }
    predicted = {
        # a duplicate of the first box, then a box shifted by 5 px for the second cell
        "a.jpg": (np.array([[0, 0, 10, 10], [0, 0, 10, 10], [25, 20, 35, 30]]), ["LY", "LY", "LY"]),
        "b.jpg": (np.array([[0, 0, 10, 10]]), ["LY"]),
    }
    result = cytologia_score(truth, predicted)
    # shifted box: intersection 50, union 150 -> IoU 1/3; enclosing box 15x10 = union -> GIoU 1/3
    rescaled = [1.0, (1 / 3 + 1) / 2, 1.0, 0.0]
    assert result["box_term"] == pytest.approx(np.mean(rescaled))
    assert result["matches"] == [("LY", "LY"), ("MO", "LY"), ("LY", "LY"), ("MO", MISSED)]
    # LY: precision 2/3 (one MO predicted as LY), recall 1 -> F1 0.8; MO: F1 0 -> macro-F1 0.4
    assert result["classification"]["macro_f1"] == pytest.approx(0.4)
    assert result["score"] == pytest.approx(0.2 * np.mean(rescaled) + 0.8 * 0.4)
    assert result["missed_boxes"] == 1 and result["true_boxes"] == 4


def test_extra_predictions_cost_nothing_in_the_challenge_score():
    truth = {"a.jpg": (np.array([[0, 0, 10, 10]]), ["LY"])}
    alone = cytologia_score(truth, {"a.jpg": (np.array([[0, 0, 10, 10]]), ["LY"])})
    crowded = cytologia_score(truth, {"a.jpg": (np.array([[0, 0, 10, 10], [50, 50, 60, 60]]), ["LY", "MO"])})
    assert alone["score"] == crowded["score"] == 1.0


def _random_detections(seed: int, images: int = 30):
    rng = np.random.default_rng(seed)
    truth, predictions = {}, {}
    for k in range(images):
        corners = rng.uniform(0, 200, (int(rng.integers(0, 4)), 2))
        boxes = np.hstack([corners, corners + rng.uniform(20, 40, corners.shape)])
        found = boxes + rng.normal(0, 6, boxes.shape)  # some hits at IoU 0.5, some misses
        extra = rng.uniform(0, 200, (int(rng.integers(0, 3)), 2))
        found = np.vstack([found, np.hstack([extra, extra + 30])])
        truth[f"{k}.png"] = boxes
        predictions[f"{k}.png"] = (found, rng.uniform(0, 1, len(found)))
    return truth, predictions


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_average_precision_is_pycocotools_ap50(seed):
    truth, predictions = _random_detections(seed)
    ours = average_precision(per_image_matches(truth, predictions))
    assert ours == pytest.approx(_coco_ap(truth, predictions)["AP50"], abs=1e-12)


def test_label_scores_match_scikit_learn():
    rng = np.random.default_rng(0)
    truth, predicted = rng.integers(0, 4, 300), rng.integers(0, 6, 300)  # predictions outside the truth's classes too
    scores = label_scores(truth, predicted)
    labels = np.unique(truth)
    assert scores["macro_f1"] == pytest.approx(
        f1_score(truth, predicted, labels=labels, average="macro", zero_division=0)
    )
    assert scores["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(truth, predicted))


def test_bootstrap_resamples_whole_images_by_hand():
    # two images: A holds three correct cells, B one wrong one. Resampling whole images can only give
    # accuracy 1 (A, A), 0 (B, B) or 3/4 (A and B): cells of one image never split.
    correct = np.array([1.0, 1.0, 1.0, 0.0])
    groups = ["A", "A", "A", "B"]
    seen = set()

    def accuracy(rows):
        seen.add(round(float(correct[rows].mean()), 6))
        return correct[rows].mean()

    low, high = bootstrap_interval(accuracy, groups, 400, 0.95, seed=0)
    assert seen == {0.0, 0.75, 1.0}
    assert (low, high) == (0.0, 1.0)
    again = bootstrap_interval(lambda rows: correct[rows].mean(), groups, 400, 0.95, seed=0)
    assert again == (low, high)  # a fixed seed gives the same interval


def test_bootstrap_interval_shrinks_with_more_images():
    rng = np.random.default_rng(1)

    def width(n):
        correct = rng.random(n) < 0.8
        low, high = bootstrap_interval(lambda rows: correct[rows].mean(), np.arange(n), 500, 0.95, seed=0)
        return high - low

    assert width(1000) < width(100) / 2.5  # about 1/sqrt(10)


def test_threshold_is_the_one_with_the_best_f1():
    truth = {"a": np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float)}
    # two true hits at 0.9 and 0.6, a false positive at 0.8, another at 0.2
    boxes = np.array([[0, 0, 10, 10], [50, 50, 60, 60], [20, 20, 30, 30], [70, 70, 80, 80]], float)
    chosen = choose_threshold(truth, {"a": (boxes, np.array([0.9, 0.8, 0.6, 0.2]))})
    # >= 0.9: P 1, R 0.5, F1 2/3; >= 0.6: P 2/3, R 1, F1 0.8; >= 0.2: P 0.5, R 1, F1 2/3
    assert chosen["score_threshold"] == 0.6 and chosen["f1_50"] == pytest.approx(0.8)


def test_expected_calibration_error_by_hand():
    confidence = np.array([0.9, 0.9, 0.9, 0.9, 0.6, 0.6])
    correct = np.array([1, 1, 1, 0, 1, 0])
    # bin 0.9: accuracy 0.75 (gap 0.15, weight 4/6); bin 0.6: accuracy 0.5 (gap 0.1, weight 2/6)
    assert expected_calibration_error(confidence, correct) == pytest.approx(4 / 6 * 0.15 + 2 / 6 * 0.1)
    assert expected_calibration_error(np.array([1.0, 1.0]), np.array([1, 1])) == 0.0


def test_spread_across_seeds_by_hand():
    spread = across_seeds({42: 0.5, 7: 0.7})
    assert spread["per_seed"] == {"42": 0.5, "7": 0.7}
    assert spread["mean"] == pytest.approx(0.6) and spread["std"] == pytest.approx(0.2 / np.sqrt(2))
    assert across_seeds({42: 0.5})["std"] is None  # one seed says nothing about the spread
