"""The ``evaluate`` stage: the held-out test split end to end, each headline number with its interval.

Test smear fields: the ``detect`` stage's boxes (the detector, tiling and threshold that
``hemaflow predict`` uses) are cut at the training field of view and classified by the method's
fold ensemble (``classify.inference``, the code ``hemaflow predict`` runs); each true box takes
the predicted box with the highest GIoU and its class, as the CytologIA organisers scored. The
same cells are also classified at their true boxes (the classifier alone). Single-cell test
images are classified from their prepared crop.

Every score is reported overall and per test domain, on fine classes and on coarse classes
(``coarse_macro_f1``: the five main leukocyte types where the data holds only those), each with
a percentile-bootstrap interval over test images (the cells of one field resampled together).
Also: calibration error on the test cells with and without temperature scaling, and the review
queue (``predict.review_below``): macro-F1 on the cells confident enough to accept and the share
sent to a hematologist, with the coverage-accuracy curve.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from hemaflow._io import write_csv, write_json
from hemaflow.classify.inference import (
    crops_at_boxes,
    ensemble_probabilities,
    fold_logits,
    predict_crops,
    seed_ensembles,
)
from hemaflow.data.classes import load_class_matrix
from hemaflow.data.images import MAX_FIELD_PIXELS, load_rgb
from hemaflow.metrics import (
    MISSED,
    SPREAD_KEYS,
    across_seeds,
    best_giou_matches,
    bootstrap_interval,
    classification_metrics,
    expected_calibration_error,
    label_scores,
)
from hemaflow.params import ClassifyParams, CropParams, EvaluateParams
from hemaflow.runtime import select_device
from hemaflow.tables import (
    boxes,
    labelled,
    on_images,
    read_cells,
    read_crop,
    read_detections,
    read_detections_card,
    read_images,
)

__all__ = ["coverage_curve", "evaluate", "score_cells"]


def _coded(truth: pd.Series, chosen: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    codes = {label: i for i, label in enumerate(sorted(set(truth) | set(chosen)))}
    return truth.map(codes).to_numpy(), chosen.map(codes).to_numpy()


def _interval(statistic, groups: np.ndarray, evaluation: EvaluateParams, seed: int) -> list[float]:
    return list(bootstrap_interval(statistic, groups, evaluation.bootstrap, evaluation.confidence, seed))


def _label_intervals(
    truth: np.ndarray, chosen: np.ndarray, groups: np.ndarray, evaluation: EvaluateParams, seed: int
) -> dict:
    return {
        f"{key}_interval": _interval(
            lambda rows, key=key: label_scores(truth[rows], chosen[rows])[key], groups, evaluation, seed
        )
        for key in ("macro_f1", "balanced_accuracy")
    }


def score_cells(cells: pd.DataFrame, column: str, evaluation: EvaluateParams, seed: int) -> dict:
    """Scores of ``cells`` (``fine_class`` against ``column``) with intervals resampling ``image``.

    Fine classes and coarse groups; where cells carry a ``rescaled_giou`` (smear fields, end to
    end), the CytologIA score of those cells too.
    """
    matrix = load_class_matrix()
    groups = cells["image"].to_numpy()
    result: dict = {"cells": len(cells), "images": int(cells["image"].nunique())}
    for prefix, truth, chosen in (
        ("", cells["fine_class"], cells[column]),
        ("coarse_", pd.Series(matrix.coarse(cells["fine_class"])), pd.Series(matrix.coarse(cells[column]))),
    ):
        t, p = _coded(truth, chosen)
        result |= {f"{prefix}{k}": v for k, v in label_scores(t, p).items()}
        result |= {f"{prefix}{k}": v for k, v in _label_intervals(t, p, groups, evaluation, seed).items()}
    result["per_class"] = classification_metrics(list(cells["fine_class"]), list(cells[column]))["per_class"]
    fields = cells[cells["rescaled_giou"].notna()] if "rescaled_giou" in cells else cells.iloc[:0]
    if len(fields):
        t, p = _coded(fields["fine_class"], fields[column])
        rescaled = fields["rescaled_giou"].to_numpy(np.float64)

        def cytologia(rows: np.ndarray) -> float:
            return 0.2 * float(rescaled[rows].mean()) + 0.8 * label_scores(t[rows], p[rows])["macro_f1"]

        result["cytologia"] = {
            "score": cytologia(np.arange(len(fields))),
            "score_interval": _interval(cytologia, fields["image"].to_numpy(), evaluation, seed),
            "box_term": float(rescaled.mean()),
            "missed_boxes": int((fields[column] == MISSED).sum()),
            "true_boxes": len(fields),
        }
    return result


def _matched_boxes(truth: pd.DataFrame, found: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Per true box of one field: the detection of highest GIoU (CytologIA's rule; NaN row: none) and (GIoU + 1) / 2 (0: none)."""
    candidates = np.unique(boxes(found), axis=0) if len(found) else np.zeros((0, 4))
    best, giou, _ = best_giou_matches(boxes(truth), candidates)
    chosen = np.full((len(truth), 4), np.nan)
    chosen[best >= 0] = candidates[best[best >= 0]]
    return chosen, np.where(best >= 0, (giou + 1) / 2, 0.0)


def _crops(test: pd.DataFrame, detections: pd.DataFrame | None, prepared: Path, geometry: CropParams):
    """Every crop to classify, in order: per test cell its crop at the matched detection (smear
    fields, end to end) or its prepared crop (single-cell images, and every cell when no detector
    was trained), then the field cells at their true boxes."""
    end_to_end, at_truth, rescaled = [], [], np.full(len(test), np.nan)
    position = {index: k for k, index in enumerate(test.index)}
    detected = pd.Series(False, index=test.index)
    if detections is not None:  # through the detector: the cells of the fields the detect stage ran on
        fields = read_images(prepared).query("field != ''")
        detected[:] = on_images(test, fields)
    by_image = dict(tuple(detections.groupby("image"))) if detections is not None else {}
    for image, truth in tqdm(test[detected].groupby("image", sort=True), desc="evaluate fields", unit="field"):
        chosen, score = _matched_boxes(truth, by_image.get(image, detections.iloc[:0]))
        rgb = load_rgb(Path(image), MAX_FIELD_PIXELS)[0]
        ppu = float(truth["px_per_um"].iloc[0])
        rows = [position[i] for i in truth.index]
        hit = ~np.isnan(chosen[:, 0])
        end_to_end += list(zip(np.asarray(rows)[hit], crops_at_boxes(rgb, chosen[hit], ppu, geometry), strict=True))
        at_truth += list(zip(rows, crops_at_boxes(rgb, boxes(truth), ppu, geometry), strict=True))
        rescaled[rows] = score
    for index, row in test[~detected].iterrows():
        end_to_end.append((position[index], read_crop(prepared / row["crop"])))
    return end_to_end, at_truth, rescaled


def _spread(ensembles: dict, cells: pd.DataFrame, end_to_end: list, classify: ClassifyParams, device) -> dict:
    """Macro-F1 and balanced accuracy of every training seed's ensemble on the same crops: mean and
    standard deviation across seeds, overall and per domain."""
    rows = [r for r, _ in end_to_end]
    first, *others = ensembles
    predicted = {first: cells["predicted"]}  # already predicted: the pipeline's ensemble
    for seed in others:
        ensemble = ensembles[seed]
        probabilities = predict_crops(ensemble, [c for _, c in end_to_end], classify.tta, device)
        predicted[seed] = cells["predicted"].copy()  # MISSED where no box was found: the same for every seed
        predicted[seed].loc[rows] = np.array(ensemble[0][1].classes)[probabilities.argmax(1)]

    def spread(part: pd.DataFrame) -> dict:
        scores = {
            seed: label_scores(*_coded(part["fine_class"], chosen[part.index])) for seed, chosen in predicted.items()
        }
        return {key: across_seeds({seed: v[key] for seed, v in scores.items()}) for key in SPREAD_KEYS}

    return {"overall": spread(cells), "domains": {domain: spread(part) for domain, part in cells.groupby("domain")}}


def _calibration(cells: pd.DataFrame) -> dict:
    """Expected calibration error of the chosen class on the test cells that were found."""
    found = cells[cells["predicted"] != MISSED]
    correct = (found["predicted"] == found["fine_class"]).to_numpy(float)
    return {
        "ece": expected_calibration_error(found["confidence"].to_numpy(), correct),
        "ece_uncalibrated": expected_calibration_error(found["confidence_raw"].to_numpy(), correct),
    }


def coverage_curve(cells: pd.DataFrame) -> pd.DataFrame:
    """Accuracy of the accepted cells as the confidence needed to accept one rises (a review queue)."""
    ranked = cells.sort_values("confidence", ascending=False, kind="stable")
    correct = (ranked["predicted"] == ranked["fine_class"]).to_numpy(float)
    kept = np.arange(1, len(ranked) + 1)
    curve = pd.DataFrame(
        {
            "threshold": ranked["confidence"].to_numpy(),
            "coverage": kept / len(ranked),
            "accuracy": np.cumsum(correct) / kept,
        }
    )
    return curve.groupby("threshold", sort=False).last().reset_index()


def _review(cells: pd.DataFrame, below: float, plots: Path) -> dict:
    """What ``predict.review_below`` does on the test split: the cells accepted, their macro-F1, the share sent to review."""
    write_csv(plots / "coverage.csv", coverage_curve(cells).round(4))
    accepted = cells[cells["confidence"] >= below]
    result = {
        "review_below": below,
        "review_share": float(1 - len(accepted) / len(cells)),
        "accepted_cells": len(accepted),
    }
    if len(accepted):
        scores = classification_metrics(list(accepted["fine_class"]), list(accepted["predicted"]))
        result["accepted_macro_f1"] = scores["macro_f1"]
    return result


def evaluate(
    *,
    method: str,
    geometry: CropParams,
    classify: ClassifyParams,
    review_below: float,
    evaluation: EvaluateParams,
    seed: int,
    prepared: Path,
    detections: Path,
    classifier: Path,
    out: Path,
    metrics: Path,
    plots: Path,
) -> None:
    """Score the method's classifier on every labelled test cell; write ``metrics``, ``plots`` and ``out`` (one row per cell)."""
    test = labelled(read_cells(prepared), "test").reset_index(drop=True)
    if test.empty:  # a dataset without labelled test cells (a challenge's hidden test set): nothing to score
        reason = "no labelled test cells (give a labelled dataset role: test, or set prepare.test_fold)"
        write_json(metrics, {"method": method, "status": "none", "reason": reason})
        write_csv(out, test)
        write_csv(plots / "confusion.csv", pd.DataFrame(columns=["actual", "predicted"]))
        write_csv(plots / "per_class_f1.csv", pd.DataFrame(columns=["class", "f1"]))
        write_csv(plots / "coverage.csv", pd.DataFrame(columns=["threshold", "coverage", "accuracy"]))
        return
    ensembles = seed_ensembles(classifier)
    ensemble = next(iter(ensembles.values()))  # the pipeline's: the first seed's
    classes = np.array(ensemble[0][1].classes)
    device = select_device(classify.device, "classify.device")
    card = read_detections_card(detections)
    found = read_detections(detections, ("test",)) if card["detector"] != "none" else None
    end_to_end, at_truth, rescaled = _crops(test, found, prepared, geometry)
    logits = fold_logits(ensemble, [c for _, c in end_to_end + at_truth], classify.tta, device, 64)
    calibrated, raw = (
        ensemble_probabilities(ensemble, logits),
        ensemble_probabilities(ensemble, logits, calibrated=False),
    )
    split = len(end_to_end)
    rows = [r for r, _ in end_to_end]
    cells = test.assign(
        predicted=MISSED, confidence=0.0, confidence_raw=0.0, rescaled_giou=rescaled, predicted_at_true_box=None
    )
    cells.loc[rows, "predicted"] = classes[calibrated[:split].argmax(1)]
    cells.loc[rows, "confidence"] = calibrated[:split].max(1)
    cells.loc[rows, "confidence_raw"] = raw[:split].max(1)
    cells.loc[[r for r, _ in at_truth], "predicted_at_true_box"] = classes[calibrated[split:].argmax(1)]

    result: dict = {
        "method": method,
        "detector": card["detector"],
        "overall": score_cells(cells, "predicted", evaluation, seed),
        "domains": {},
    }
    for domain, part in cells.groupby("domain"):
        result["domains"][domain] = score_cells(part, "predicted", evaluation, seed)
        boxed = part[part["predicted_at_true_box"].notna()]
        if len(boxed):  # the classifier alone: the same cells at their true boxes
            at_box = boxed.drop(columns="rescaled_giou")
            result["domains"][domain]["at_true_boxes"] = score_cells(at_box, "predicted_at_true_box", evaluation, seed)
    result["seeds"] = _spread(ensembles, cells, end_to_end, classify, device)
    result["calibration"] = _calibration(cells)
    result["review"] = _review(cells, review_below, plots)
    write_json(metrics, result)
    confusion = cells[["fine_class", "predicted"]].rename(columns={"fine_class": "actual"})
    write_csv(plots / "confusion.csv", confusion.sort_values(["actual", "predicted"], kind="stable"))
    per_class = result["overall"]["per_class"]
    write_csv(plots / "per_class_f1.csv", pd.DataFrame([{"class": c, "f1": v["f1"]} for c, v in per_class.items()]))
    write_csv(out, cells.round(4))
