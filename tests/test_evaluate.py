"""Scores and ensembles of the evaluation stage, and the cross-domain table, on hand-checked inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hemaflow.evaluate.compare import compare
from hemaflow.evaluate.ensemble import fuse_boxes
from hemaflow.metrics import MISSED, cytologia_score


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
    assert result["mean_giou"] == pytest.approx((1 + 1 / 3 + 1) / 3)


def test_extra_predictions_cost_nothing_in_the_challenge_score():
    truth = {"a.jpg": (np.array([[0, 0, 10, 10]]), ["LY"])}
    alone = cytologia_score(truth, {"a.jpg": (np.array([[0, 0, 10, 10]]), ["LY"])})
    crowded = cytologia_score(truth, {"a.jpg": (np.array([[0, 0, 10, 10], [50, 50, 60, 60]]), ["LY", "MO"])})
    assert alone["score"] == crowded["score"] == 1.0


def test_weighted_box_fusion_merges_agreeing_detectors():
    first = (np.array([[10.0, 10, 50, 50]]), np.array([0.9]))
    second = (np.array([[12.0, 10, 52, 50], [200, 200, 240, 240]]), np.array([0.7, 0.8]))
    boxes, scores = fuse_boxes([first, second], [1.0, 1.0], 320, 320, 0.55)
    order = np.argsort(boxes[:, 0])
    boxes, scores = boxes[order], scores[order]
    assert len(boxes) == 2
    assert boxes[0] == pytest.approx([10 + 2 * 0.7 / 1.6, 10, 50 + 2 * 0.7 / 1.6, 50], abs=1e-3)  # score-weighted
    assert scores[0] == pytest.approx(0.8) and scores[1] == pytest.approx(0.4)  # seen by one of two detectors
    assert fuse_boxes([first], [1.0], 320, 320, 0.55) is first
    with pytest.raises(ValueError, match="2 detectors but 1 weights"):
        fuse_boxes([first, second], [1.0], 320, 320, 0.55)


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_compare_builds_the_cross_domain_table_and_report(tmp_path):
    metrics = tmp_path / "metrics"
    for method, oof, target in (("none", 0.95, 0.55), ("cyclegan", 0.93, 0.81)):
        _write(metrics / "classify" / f"{method}.json", {"oof": {"macro_f1": oof}})
        _write(metrics / "evaluate" / f"{method}.json", {
            "cytologia_score": target - 0.01, "box_term": 0.9, "macro_f1": target, "coarse_macro_f1": target,
            "balanced_accuracy": target, "missed_boxes": 2, "cells": 50,
            "domains": {"wbc1": {"macro_f1": target}, "other": {"single_cell": {"macro_f1": 0.5}}},
        })  # fmt: skip
        kid = {"mean": 0.1, "std": 0.01}
        _write(metrics / "translate" / f"{method}.json",
               {"ssim_luminance": 0.9, "kid_random_resnet18": {"source_to_target": kid, "translated_to_target": kid}})  # fmt: skip
    report = tmp_path / "reports" / "README.md"
    compare(["none", "cyclegan"], "cyclegan", metrics, metrics / "cross_domain.json", tmp_path / "plots", report)
    table = json.loads((metrics / "cross_domain.json").read_text())
    assert table["macro_f1"]["cyclegan"] == {"source (out-of-fold)": 0.93, "wbc1 (test)": 0.81, "other (test)": 0.5}
    assert table["macro_f1"]["none"]["wbc1 (test)"] == 0.55 and table["selected_method"] == "cyclegan"
    assert (tmp_path / "plots" / "table.png").stat().st_size > 1000
    text = report.read_text()
    assert "| cyclegan | 0.5000 | 0.9300 | 0.8100 |" in text and "CytologIA score" in text
