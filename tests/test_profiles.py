"""The shipped profiles validate, and the real-data one runs end to end: the pipeline follows the data."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, SHARED_DATA, TEST_THREADS, recipe, shared_dataset
from hemaflow._scratch import scratch_env, scratch_repository
from hemaflow.params import apply_profile, parse_params

PROFILES = sorted((REPO / "profiles").glob("*.yaml"))


@pytest.mark.parametrize("profile", PROFILES, ids=[p.stem for p in PROFILES])
def test_every_profile_gives_valid_params(profile):
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    params = parse_params(apply_profile(copy.deepcopy(base), yaml.safe_load(profile.read_text())), profile.name)
    assert params.prepare.datasets


def test_a_profile_replaces_lists_and_method_tables_but_merges_sections():
    base = {
        "prepare": {"folds": 5, "crop": {"pixels": 64, "fov_um": 25.0}, "datasets": [{"name": "a"}, {"name": "b"}]},
        "adapt": {"methods": {"none": {}, "reinhard": {}}, "deploy": "none"},
    }
    overlay = {"prepare": {"crop": {"pixels": 128}, "datasets": [{"name": "c"}]}, "adapt": {"methods": {"none": {}}}}
    merged = apply_profile(base, overlay)
    assert merged["prepare"] == {"folds": 5, "crop": {"pixels": 128, "fov_um": 25.0}, "datasets": [{"name": "c"}]}
    assert merged["adapt"] == {"methods": {"none": {}}, "deploy": "none"}


TINY_BUDGET = {
    "base": {"cpu_threads": TEST_THREADS},  # one thread per pytest-xdist worker
    "demo_data": {"cells_per_class": 2, "fields_per_domain": 2, "target_unlabelled_cells": 2, "target_test_cells": 0},
    "model": {"img_size": 32},
    "classify": {"folds": 1, "epochs": 1, "batch_size": 32},
    # The data's shape is under test here; the adaptation methods have the pipeline test and the benchmark.
    "translate": {"methods": ["none"], "reference_cells": 32, "cyclegan": {"train": False}},
    "adapt": {"methods": {"none": recipe()}, "deploy": "none"},
    "evaluate": {"bootstrap": 200},
}


@pytest.mark.slow
def test_the_real_data_profile_runs_end_to_end_with_no_detector(tmp_path):
    shared_dataset("acevedo20_subset"), shared_dataset("cellavision_blog")
    work = tmp_path / "repo"
    scratch_repository(
        REPO, work, skip=lambda name: name.startswith(("metrics/", "plots/", "reports/")) or name == "dvc.lock"
    )
    datasets = yaml.safe_load((REPO / "profiles" / "shared.yaml").read_text())["prepare"]["datasets"]
    # the scratch copy is not beside ../shared; a fixed 15 % of the source cells keeps the run short
    datasets = [d | {"part": [0.0, 0.15]} if d["role"] == "source" else d for d in datasets]
    budget = TINY_BUDGET | {"prepare": {"root": str(SHARED_DATA), "datasets": datasets}}
    (work / "budget.yaml").write_text(yaml.safe_dump(budget))
    env = scratch_env()

    def run(*command: str) -> subprocess.CompletedProcess:
        result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
        assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return result

    run(sys.executable, "-m", "hemaflow", "params", "use", "profiles/shared.yaml")
    run(sys.executable, "-m", "hemaflow", "params", "use", "budget.yaml")
    run(sys.executable, "-m", "dvc", "repro")
    card = json.loads((work / "models" / "detector" / "detector.json").read_text())
    assert card["status"] == "none" and "no smear fields" in card["reason"]
    assert json.loads((work / "metrics" / "detect.json").read_text())["detector"] == "none"
    data = json.loads((work / "metrics" / "data.json").read_text())
    scales = data["estimated_scale"]
    assert scales["cellavision"]["px_per_um"] == pytest.approx(9.5363, abs=1e-3)  # all 100 images, red cells
    assert scales["cellavision_slice"] == scales["cellavision_test"] == scales["cellavision"]  # one folder
    evaluation = json.loads((work / "metrics" / "evaluate" / "none.json").read_text())
    # the blog's 100 cells: a fixed 30 % is the labelled few-shot slice, the other 68 the test split
    assert evaluation["detector"] == "none" and evaluation["domains"]["cellavision"]["cells"] == 68
    selection = json.loads((work / "metrics" / "classify" / "none.json").read_text())["selection"]
    assert selection["target_labelled_cells"] == 32  # every slice cell scored, though one fold model is trained
    report = (work / "reports" / "README.md").read_text()
    assert "No detector took part" in report and "cellavision (test)" in report
