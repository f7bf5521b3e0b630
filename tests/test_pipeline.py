"""The DVC pipeline end to end, in a throw-away copy of the repository (never the developer's)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import REPO, TINY_DEMO
from hemaflow._scratch import scratch_env, scratch_repository

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    work = tmp_path_factory.mktemp("pipeline") / "repo"
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["demo_data"].update(TINY_DEMO)
    params["prepare"]["folds"] = 2
    params["model"]["img_size"] = 32
    params["classify"].update(folds=1, epochs=2, batch_size=16)
    # ~9 training fields: 30 short epochs (about a minute) are what it takes to propose real boxes
    params["detect"].update(epochs=30, batch_size=4)
    params["translate"]["cyclegan"].update(img_size=32, ngf=8, ndf=8, n_blocks=1, epochs=1, epochs_decay=1, batch_size=4)
    # start as a fresh clone would before its first run, on tiny params
    scratch_repository(REPO, work, skip=lambda name: name.startswith(("metrics/", "plots/")) or name == "dvc.lock",
                       files={"params.yaml": yaml.safe_dump(params, sort_keys=False)})  # fmt: skip
    env = scratch_env()

    def run(*command: str) -> subprocess.CompletedProcess:
        result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
        assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
        return result

    return work, run


def test_repro_builds_everything_then_does_nothing(workspace):
    work, run = workspace
    run(sys.executable, "-m", "dvc", "repro")
    prepared = work / "data" / "prepared"
    for name in ("cells.csv", "images.csv", "findings.csv", "coco/train.json", "coco/val.json", "coco/test.json"):
        assert (prepared / name).is_file(), name
    metrics = json.loads((work / "metrics" / "data.json").read_text())
    assert metrics["rejected"] == 0
    assert set(metrics["counts"]) == {"acevedo", "matek", "wbc1"}
    assert metrics["missing_classes"]["acevedo"] == 1  # Acevedo_20 has no blasts, as in reality
    assert (work / "plots" / "data" / "class_by_domain.png").stat().st_size > 1000
    coco = json.loads((prepared / "coco" / "train.json").read_text())
    assert coco["categories"] == [{"id": 1, "name": "wbc"}] and coco["annotations"]
    methods = ["none", "reinhard", "macenko", "cyclegan"]
    for method in methods:
        classify = json.loads((work / "metrics" / "classify" / f"{method}.json").read_text())
        assert classify["resolved_backbone"] == "resnet18" and "macro_f1" in classify["oof"]
        assert (work / "models" / "classifier" / method / "fold0.safetensors").exists()
        evaluation = json.loads((work / "metrics" / "evaluate" / f"{method}.json").read_text())
        assert evaluation["cells"] > 0 and 0 <= evaluation["cytologia_score"] <= 1
    detect = json.loads((work / "metrics" / "detect.json").read_text())
    assert {"val", "test"} <= set(detect) and 0 <= detect["val"]["AP50"] <= 1
    assert (work / "data" / "detections" / "test.csv").exists()
    table = json.loads((work / "metrics" / "cross_domain.json").read_text())
    assert set(table["macro_f1"]) == set(methods) and "wbc1 (test)" in table["macro_f1"]["none"]
    assert (work / "plots" / "translate" / "umap.png").stat().st_size > 1000
    assert "Cross-domain macro-F1" in (work / "reports" / "README.md").read_text()

    again = run(sys.executable, "-m", "dvc", "repro")
    assert "Data and pipelines are up to date" in again.stdout
    run(sys.executable, "-m", "dvc", "status", "-q", "dvc.yaml")  # data.dvc has no cache in a fresh clone


def test_experiment_on_a_param_and_its_diffs(workspace):
    work, run = workspace
    run(sys.executable, "-m", "dvc", "repro")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "baseline")
    run(sys.executable, "-m", "dvc", "exp", "run", "-S", "prepare.folds=4", "-n", "four-folds")
    shown = json.loads(run(sys.executable, "-m", "dvc", "exp", "show", "--json").stdout)
    assert "four-folds" in json.dumps(shown)
    diff = run(sys.executable, "-m", "dvc", "metrics", "diff").stdout
    assert "cells.by_split.val" in diff
    run(sys.executable, "-m", "dvc", "plots", "diff", "-o", "plots_html")
    assert (work / "plots_html" / "index.html").stat().st_size > 1000


def test_the_users_vit_large_experiment(workspace):
    work, run = workspace
    run(sys.executable, "-m", "dvc", "exp", "run", "-S", "model.backbone=vit_large", "-S", "classify.epochs=1", "-n", "vit")
    metrics = json.loads((work / "metrics" / "classify" / "cyclegan.json").read_text())
    assert metrics["resolved_backbone"] == "vit_large_patch16_224"
    assert "vit_large" in run(sys.executable, "-m", "dvc", "exp", "show", "--json").stdout


def test_predict_writes_one_row_per_detected_cell_and_annotated_images(workspace):
    work, run = workspace
    run(sys.executable, "-m", "dvc", "repro")
    # the tiny test detector scores low: keep every box it proposes, so the CSV has rows to check
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["detect"]["score_threshold"] = 0.001
    (work / "loose.yaml").write_text(yaml.safe_dump(params))
    fields = work / "data" / "demo" / "wbc1_fields" / "images"
    images = sorted(fields.glob("*.jpg"))
    common = ("--px-per-um", "11.52", "--params", "loose.yaml")
    result = run(sys.executable, "-m", "hemaflow", "predict", str(fields), *common, "--out", "pred.csv",
                 "--annotated", "annotated")  # fmt: skip
    assert f"{len(images)} images" in result.stdout and "ms/image" in result.stdout
    table = pd.read_csv(work / "pred.csv")
    assert list(table.columns[:6]) == ["NAME", "x1", "y1", "x2", "y2", "class"]  # the CytologIA layout
    classes = json.loads((work / "models" / "classifier" / "cyclegan" / "fold0.json").read_text())["classes"]
    assert len(table) > 0 and set(table["class"]) <= set(classes)
    assert ((table["x2"] > table["x1"]) & (table["y2"] > table["y1"])).all()
    run(sys.executable, "-m", "hemaflow", "detect", str(fields), *common, "--out", "boxes.csv")
    boxes = pd.read_csv(work / "boxes.csv")
    per_image = table.groupby("NAME").size().to_dict()
    assert per_image == {Path(name).name: n for name, n in boxes.groupby("image").size().items()}
    assert len(list((work / "annotated").glob("*.jpg"))) == len(images)
