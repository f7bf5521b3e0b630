"""The ``evaluate`` stage: the held-out test split end to end, scored as the CytologIA challenge did.

Test smear fields go through ``CellPipeline`` (detector, crop, classifier: exactly what
``hemaflow predict`` runs); each true box takes the predicted box with the highest GIoU and its
class (``hemaflow.metrics.cytologia_score``). Test cells that come as single-cell images (no
box) are classified from their prepared crop. Scores are reported overall and per test domain,
on fine classes and on the five main types (coarse classes).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from hemaflow._io import write_csv, write_json
from hemaflow.data.classes import load_class_matrix
from hemaflow.data.images import load_rgb
from hemaflow.errors import HemaflowError
from hemaflow.metrics import classification_metrics, cytologia_score
from hemaflow.params import Params
from hemaflow.predict import MAX_FIELD_PIXELS, CellPipeline

__all__ = ["evaluate"]


def _scores(matches: list[tuple[str, str]], coarse_of: dict[str, str]) -> dict:
    fine = classification_metrics([a for a, _ in matches], [p for _, p in matches])
    coarse = classification_metrics([coarse_of[a] for a, _ in matches], [coarse_of.get(p, p) for _, p in matches])
    return {
        "macro_f1": fine["macro_f1"],
        "balanced_accuracy": fine["balanced_accuracy"],
        "accuracy": fine["accuracy"],
        "coarse_macro_f1": coarse["macro_f1"],
        "per_class": fine["per_class"],
        "cells": len(matches),
    }


def evaluate(params: Params, method: str, prepared: Path, detector: Path, classifier: Path, predictions: Path,
             metrics: Path, plots: Path) -> None:  # fmt: skip
    """Score the test split end to end; write ``metrics``, ``plots`` and the per-cell ``predictions``."""
    cells = pd.read_csv(prepared / "cells.csv", keep_default_na=False)
    images = pd.read_csv(prepared / "images.csv", keep_default_na=False)
    test = cells[(cells["role"] == "test") & (cells["fine_class"] != "")]
    if test.empty:
        raise HemaflowError(f"{prepared / 'cells.csv'}: no labelled test cells (give a dataset role: test)")
    pipeline = CellPipeline.load(params, detector, classifier, params.detect.device)
    coarse_of = load_class_matrix().coarse_of
    boxed = test[test["x1"] != ""]
    fields = images[(images["split"] == "test") & (images["field"] != "")]
    rows, per_domain, box_results = [], {}, {}
    tick = time.perf_counter()
    for field in tqdm(fields.itertuples(), total=len(fields), desc=f"evaluate ({method})", unit="field"):
        rgb, _, _ = load_rgb(Path(field.image), MAX_FIELD_PIXELS)
        prediction = pipeline(rgb, field.px_per_um)
        truth = boxed[boxed["image"] == field.image]
        box_results.setdefault(field.domain, ({}, {}))
        box_results[field.domain][0][field.image] = (truth[["x1", "y1", "x2", "y2"]].to_numpy(float), list(truth["fine_class"]))
        box_results[field.domain][1][field.image] = (prediction.boxes, prediction.classes)
        rows += [{"image": field.image, "x1": b[0], "y1": b[1], "x2": b[2], "y2": b[3], "class": c, "box_score": s,
                  "class_confidence": p} for b, c, s, p in zip(prediction.boxes, prediction.classes, prediction.scores,
                                                                prediction.confidence, strict=True)]  # fmt: skip
    seconds_per_field = (time.perf_counter() - tick) / len(fields) if len(fields) else None
    all_matches: list[tuple[str, str]] = []
    for domain, (truth, predicted) in box_results.items():
        if not any(len(t[1]) for t in truth.values()):
            continue
        result = cytologia_score(truth, predicted)
        all_matches += result["matches"]
        per_domain[domain] = _scores(result["matches"], coarse_of) | {
            "cytologia_score": result["score"], "box_term": result["box_term"], "mean_giou": result["mean_giou"],
            "missed_boxes": result["missed_boxes"], "fields": len(truth),
        }  # fmt: skip
    single = test[test["x1"] == ""]
    if not single.empty:  # single-cell test images: the classifier alone, on prepare's crops
        crops = [np.asarray(Image.open(prepared / p).convert("RGB")) for p in single["crop"]]
        chosen = [pipeline.classes[i] for i in pipeline.classify(crops).argmax(1)]
        for domain, part in single.assign(predicted=chosen).groupby("domain"):
            matches = list(zip(part["fine_class"], part["predicted"], strict=True))
            all_matches += matches
            per_domain.setdefault(domain, {}).update({"single_cell": _scores(matches, coarse_of)})
    overall = _scores(all_matches, coarse_of)
    boxed_truth = {f"{d}/{k}": v for d, (t, _) in box_results.items() for k, v in t.items()}
    boxed_pred = {f"{d}/{k}": v for d, (_, p) in box_results.items() for k, v in p.items()}
    if any(len(v[1]) for v in boxed_truth.values()):
        overall_box = cytologia_score(boxed_truth, boxed_pred)
        overall |= {"cytologia_score": overall_box["score"], "box_term": overall_box["box_term"],
                    "mean_giou": overall_box["mean_giou"], "missed_boxes": overall_box["missed_boxes"]}  # fmt: skip
    write_json(metrics, {"method": method, **overall, "domains": per_domain,
                         "seconds_per_field": seconds_per_field, "predicted_cells": len(rows)})  # fmt: skip
    confusion = pd.DataFrame(all_matches, columns=["actual", "predicted"]).sort_values(["actual", "predicted"], kind="stable")
    write_csv(plots / "confusion.csv", confusion)
    f1 = pd.DataFrame([{"class": c, "f1": v["f1"]} for c, v in overall["per_class"].items()])
    write_csv(plots / "per_class_f1.csv", f1)
    write_csv(predictions, pd.DataFrame(rows, columns=["image", "x1", "y1", "x2", "y2", "class", "box_score",
                                                        "class_confidence"]).round(4))  # fmt: skip

