"""Evaluation, prediction and the report: the numbers of `evaluate` are those of `hemaflow predict`,
every headline number has its interval, and every link of the report resolves."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import REPO, hemaflow_command, load, run
from hemaflow.evaluate.compare import against_baseline, compare
from hemaflow.evaluate.evaluate import coverage_curve, evaluate
from hemaflow.metrics import MISSED, bootstrap_interval, label_scores
from hemaflow.predict import image_names


def _links(report: Path) -> list[Path]:
    return [
        report.parent / target for target in re.findall(r"\]\(([^)#]+)\)", report.read_text()) if "://" not in target
    ]


def test_every_link_of_the_committed_report_and_readme_resolves():
    for page in (REPO / "reports" / "README.md", REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))):
        missing = [str(p) for p in _links(page) if not p.exists()]
        assert not missing, f"{page.name} links to missing files: {missing}"


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _scores(value):
    return {
        "macro_f1": value,
        "macro_f1_interval": [value - 0.05, value + 0.05],
        "coarse_macro_f1": value,
        "coarse_macro_f1_interval": [value - 0.05, value + 0.05],
        "balanced_accuracy": value,
        "balanced_accuracy_interval": [value - 0.05, value + 0.05],
        "cells": 50,
    }


def _spread(value):
    """Two training seeds whose scores straddle ``value`` by 0.02."""
    return {"per_seed": {"1": value - 0.02, "2": value + 0.02}, "mean": value, "std": 0.0283}


def test_compare_builds_the_table_with_intervals_and_a_report_whose_links_resolve(tmp_path, tiny_prepared):
    prepared, _ = tiny_prepared
    metrics = tmp_path / "metrics"
    for method, oof, target, information in (("none", 0.95, 0.55, 0.62), ("reinhard", 0.93, 0.81, 0.58)):
        selection = {
            "atc_target_accuracy": 0.5,
            "target_information": information,
            "target_labelled_cells": 0,
            "target_labelled_coarse_macro_f1": None,
        }
        _write(metrics / "classify" / f"{method}.json", {"oof": {"macro_f1": oof}, "selection": selection})
        overall = _scores(target) | {"cytologia": {"score": target, "score_interval": [0.5, 0.9], "missed_boxes": 2}}
        _write(
            metrics / "evaluate" / f"{method}.json",
            {
                "overall": overall,
                "domains": {"wbc1": _scores(target) | {"at_true_boxes": _scores(target + 0.1)}},
                "calibration": {"ece": 0.05, "ece_uncalibrated": 0.2},
                "seeds": {
                    "overall": {"macro_f1": _spread(target)},
                    "domains": {"wbc1": {"macro_f1": _spread(target)}},
                },
            },
        )
    kid = {"mean": 0.1, "std": 0.01}
    for translation in ("none", "reinhard"):
        _write(
            metrics / "translate" / f"{translation}.json",
            {"ssim_luminance": 0.9, "kid_random_resnet18": {"source_to_target": kid, "translated_to_target": kid}},
        )
    _write(metrics / "detect.json", {"detector": "none", "reason": "no smear fields"})
    per_class = {
        "basophil": {"kept": 0.9, "cells": 10, "mostly_became": "monocyte", "mostly_became_share": 0.1},
        "neutrophil": {"kept": 0.4, "cells": 10, "mostly_became": "lymphocyte", "mostly_became_share": 0.6},
    }
    _write(
        metrics / "check_translations.json",
        {"class_kept": {name: {"kept": 0.65, "per_class": per_class} for name in ("untranslated", "none", "reinhard")}},
    )
    translated = tmp_path / "translated"
    for translation in ("none", "reinhard"):
        shutil.copytree(prepared, translated / translation)
    report = tmp_path / "reports" / "README.md"
    plots = tmp_path / "plots"
    (plots / "data").mkdir(parents=True)
    (plots / "data" / "class_by_domain.png").write_bytes(b"png")
    for translation in ("none", "reinhard"):
        (plots / "translate" / translation).mkdir(parents=True)
        (plots / "translate" / translation / "samples.png").write_bytes(b"png")
    evaluated = tmp_path / "evaluated"
    evaluated.mkdir()
    truth = ["neutrophil_segmented", "lymphocyte_typical", "monocyte", "eosinophil"] * 5
    cells = pd.DataFrame({"cell_id": range(20), "image": [f"i{k}" for k in range(20)], "fine_class": truth})
    cells.assign(predicted=["monocyte"] * 20).to_csv(evaluated / "none.csv", index=False)
    cells.assign(predicted=truth).to_csv(evaluated / "reinhard.csv", index=False)
    # out of fold on the source: none right on every cell, reinhard wrong on every fourth
    source = pd.read_csv(prepared / "cells.csv", keep_default_na=False).query("role == 'source'").head(40)
    classifiers = tmp_path / "classifiers"
    for method, wrong in (("none", []), ("reinhard", source["cell_id"].iloc[::4])):
        (classifiers / method).mkdir(parents=True)
        oof = source[["cell_id", "fine_class"]].assign(predicted=source["fine_class"])
        oof.loc[oof["cell_id"].isin(wrong), "predicted"] = "platelet"
        oof.to_csv(classifiers / method / "oof.csv", index=False)
    compare(
        methods=["none", "reinhard"],
        deployed="auto",
        source_tolerance=0.02,
        translations=["none", "reinhard"],
        metrics=metrics,
        evaluated=evaluated,
        classifiers=classifiers,
        evaluation=load({}).evaluate,
        seed=0,
        prepared=prepared,
        translated=translated,
        out=metrics / "cross_domain.json",
        plots=plots / "cross_domain",
        translate_plots=plots / "translate",
        report=report,
    )
    table = json.loads((metrics / "cross_domain.json").read_text())
    assert table["macro_f1"]["reinhard"] == {"source (out-of-fold)": 0.93, "wbc1 (test)": 0.81}
    assert table["macro_f1_interval"]["reinhard"]["wbc1 (test)"] == pytest.approx([0.76, 0.86])
    text = report.read_text()
    assert "| reinhard | 0.9300 | 0.8100 [0.7600, 0.8600] |" in text and "No detector took part" in text
    assert "0.8100 ± 0.0283 (2 seeds)" in text and "neutrophil 0.40 (mostly became lymphocyte)" in text
    assert table["macro_f1_across_seeds"]["reinhard"]["wbc1 (test)"] == {"mean": 0.81, "std": 0.0283}
    # chosen without test labels (the more informative target predictions), though the test split prefers reinhard
    assert (table["deployed_method"], table["best_on_test"]) == ("none", "reinhard")
    assert "is **none**: most informative target predictions without target labels (IM 0.6200 nats)" in text
    assert all(p.exists() for p in _links(report)) and len(_links(report)) >= 4
    gain = table["coarse_macro_f1_minus_none"]["reinhard"]  # every cell right against a quarter
    assert gain["difference"] == pytest.approx(1 - 0.1, abs=1e-9) and gain["interval"][0] > 0.5
    assert "| +0.9000 [" in text and "minus none, paired" in text
    cost = table["oof_macro_f1_minus_none"]["reinhard"]  # a source cost, paired over the same source images
    assert cost["cells"] == 40 and cost["interval"][0] <= cost["difference"] < cost["interval"][1] < 0
    assert "| wbc1: 0.9100 [0.8600, 0.9600] |" in text  # the classifier alone, at the fields' true boxes


def test_a_paired_interval_separates_methods_that_two_separate_intervals_cannot():
    rng = np.random.default_rng(0)
    types = np.array(["neutrophil_segmented", "lymphocyte_typical", "monocyte", "eosinophil", "basophil"])
    truth = types[rng.integers(0, 5, 60)]
    wrong = np.array([types[(list(types).index(t) + 1) % 5] for t in truth])
    # none is right on about 70 % of the cells; the method on the same cells and on 10 more
    baseline_right = rng.random(60) < 0.7
    method_right = baseline_right.copy()
    method_right[np.flatnonzero(~baseline_right)[:10]] = True
    cells = pd.DataFrame({"cell_id": range(60), "image": [f"i{k}" for k in range(60)], "fine_class": truth})
    none = cells.assign(predicted=np.where(baseline_right, truth, wrong))
    method = cells.assign(predicted=np.where(method_right, truth, wrong))
    evaluation = load({}).evaluate
    gain = against_baseline(method, none, evaluation, seed=0)
    assert gain["difference"] > 0 and gain["interval"][0] > 0  # never worse on any resample: the gain holds
    code = {t: i for i, t in enumerate(types)}
    coded = {name: frame["predicted"].map(code).to_numpy() for name, frame in (("none", none), ("method", method))}
    truth_codes = cells["fine_class"].map(code).to_numpy()
    (_, none_high), (method_low, _) = (
        bootstrap_interval(
            lambda rows, p=p: label_scores(truth_codes[rows], p[rows])["macro_f1"],
            list(cells["image"]),
            evaluation.bootstrap,
            evaluation.confidence,
            0,
        )
        for p in (coded["none"], coded["method"])
    )
    assert method_low < none_high  # the two intervals, each on its own, overlap
    same = against_baseline(none, none, evaluation, seed=0)
    assert same["difference"] == 0 and same["interval"] == [0.0, 0.0]


def test_coverage_curve_accepts_the_most_confident_cells_first():
    cells = pd.DataFrame(
        {"confidence": [0.9, 0.8, 0.6, 0.3], "fine_class": ["a", "a", "b", "b"], "predicted": ["a", "a", "a", "b"]}
    )
    curve = coverage_curve(cells)
    assert list(curve["coverage"]) == [0.25, 0.5, 0.75, 1.0]
    assert list(curve["accuracy"]) == pytest.approx([1.0, 1.0, 2 / 3, 0.75])


def test_names_keep_the_folder_so_class_folders_do_not_collide(tmp_path):
    for folder in ("basophil", "neutrophil"):
        (tmp_path / "cells" / folder).mkdir(parents=True)
        (tmp_path / "cells" / folder / "train_1.bmp").write_bytes(b"")
    single = tmp_path / "alone.png"
    paths = [tmp_path / "cells" / "basophil" / "train_1.bmp", tmp_path / "cells" / "neutrophil" / "train_1.bmp", single]
    assert image_names(paths, [tmp_path / "cells", single]) == [
        "basophil/train_1.bmp",
        "neutrophil/train_1.bmp",
        "alone.png",
    ]


@pytest.mark.slow
def test_evaluate_scores_every_test_cell_with_intervals(tiny_models, tmp_path):
    p = load()
    evaluate(
        method="none",
        geometry=p.prepare.crop,
        classify=p.classify,
        review_below=0.5,
        evaluation=p.evaluate,
        seed=0,
        prepared=tiny_models.prepared,
        detections=tiny_models.detections,
        classifier=tiny_models.classifier,
        out=tmp_path / "cells.csv",
        metrics=tmp_path / "m.json",
        plots=tmp_path / "plots",
    )
    metrics = json.loads((tmp_path / "m.json").read_text())
    cells = pd.read_csv(tmp_path / "cells.csv", keep_default_na=False)
    test = pd.read_csv(tiny_models.prepared / "cells.csv", keep_default_na=False).query(
        "role == 'test' and fine_class != ''"
    )
    assert len(cells) == len(test) == metrics["overall"]["cells"]
    wbc1 = metrics["domains"]["wbc1"]
    for key in ("macro_f1", "coarse_macro_f1", "balanced_accuracy"):
        low, high = wbc1[f"{key}_interval"]
        assert low <= wbc1[key] <= high
    fields = cells[cells["x1"] != ""]
    assert wbc1["cytologia"]["true_boxes"] == len(fields) and wbc1["at_true_boxes"]["cells"] == len(fields)
    assert wbc1["cytologia"]["missed_boxes"] == (fields["predicted"] == MISSED).sum()
    single = cells[cells["x1"] == ""]
    assert len(single) and (single["predicted"] != MISSED).all()  # single-cell images are never "missed"
    review = metrics["review"]
    assert review["review_share"] == pytest.approx((cells["confidence"] < 0.5).mean())
    assert (tmp_path / "plots" / "coverage.csv").exists() and 0 <= metrics["calibration"]["ece"] <= 1


@pytest.mark.slow
def test_predict_rows_are_the_detect_stage_boxes_and_flag_doubtful_cells(tiny_models, tmp_path):
    fields = tiny_models.prepared.parent / "demo" / "wbc1_fields" / "images"
    images = sorted(fields.glob("*.jpg"))
    result = run(
        hemaflow_command(
            "predict",
            str(fields),
            "--px-per-um",
            "11.52",
            "--params",
            str(tiny_models.params_file),
            "--detector",
            str(tiny_models.detector),
            "--classifier",
            str(tiny_models.classifier),
            "--out",
            str(tmp_path / "pred.csv"),
            "--annotated",
            str(tmp_path / "annotated"),
        )
    )
    assert f"{len(images)} images" in result.stdout and "ms/image" in result.stdout
    table = pd.read_csv(tmp_path / "pred.csv", keep_default_na=False)
    assert list(table.columns[:6]) == ["NAME", "x1", "y1", "x2", "y2", "class"]  # the CytologIA layout
    assert set(table["review"]) <= {"", "review"}
    assert ((table["review"] == "review") == (table["class_confidence"] < load().predict.review_below)).all()
    detected = pd.read_csv(tiny_models.detections / "test.csv")
    detected = detected[detected["image"].str.contains("wbc1_fields")]
    assert len(table) == len(detected)
    ours = np.sort(table[["x1", "y1", "x2", "y2"]].to_numpy(float), axis=0)
    assert np.allclose(ours, np.sort(detected[["x1", "y1", "x2", "y2"]].to_numpy(float), axis=0), atol=0.06)
    assert len(list((tmp_path / "annotated").glob("*.jpg"))) == len(images)
    boxes_only = run(
        hemaflow_command(
            "predict",
            str(fields),
            "--px-per-um",
            "11.52",
            "--params",
            str(tiny_models.params_file),
            "--detector",
            str(tiny_models.detector),
            "--boxes-only",
            "--out",
            str(tmp_path / "b.csv"),
        )
    )
    assert "cells" in boxes_only.stdout
    assert len(pd.read_csv(tmp_path / "b.csv")) == len(table)
