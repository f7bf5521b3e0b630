"""The DVC pipeline end to end, in a throw-away copy of the repository (never the developer's)."""

from __future__ import annotations

import json
import subprocess
import sys
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
    params["detect"].update(epochs=2, batch_size=4)
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
    classify = json.loads((work / "metrics" / "classify.json").read_text())
    assert classify["resolved_backbone"] == "resnet18" and "macro_f1" in classify["oof"]
    assert (work / "models" / "classifier" / "fold0.safetensors").exists()
    detect = json.loads((work / "metrics" / "detect.json").read_text())
    assert {"val", "test"} <= set(detect) and 0 <= detect["val"]["AP50"] <= 1
    assert (work / "data" / "detections" / "test.csv").exists()

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
    metrics = json.loads((work / "metrics" / "classify.json").read_text())
    assert metrics["resolved_backbone"] == "vit_large_patch16_224"
    assert "vit_large" in run(sys.executable, "-m", "dvc", "exp", "show", "--json").stdout
