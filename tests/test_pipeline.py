"""The DVC pipeline end to end, in a throw-away copy of the repository (never the developer's):
`dvc repro` builds every output, reruns nothing when nothing changed, and the users' own
experiment command works verbatim."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from conftest import REPO, TINY, merged, params_data, recipe
from hemaflow._scratch import scratch_env, scratch_repository

pytestmark = pytest.mark.slow

PIPELINE = params_data(
    merged(
        TINY,
        {
            "detect": {"epochs": 4},  # boxes good enough to run every stage; detection quality is tested elsewhere
            "classify": {"epochs": 1},
            "translate": {"methods": ["none"]},
            "adapt": {"deploy": "auto"},
            "evaluate": {"bootstrap": 200},
        },
    )
)
# the baseline and one method whose training cells come through every translation stage (translate@none, then
# CycleGAN) and that uses every unsupervised part of a recipe
PIPELINE["adapt"]["methods"] = {
    "none": recipe(),
    "cyclegan": recipe("cyclegan", augment=["stain", "fda"], adabn=True, self_training=0.5),
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    work = tmp_path_factory.mktemp("pipeline") / "repo"
    # start as a fresh clone would before its first run, on tiny params
    scratch_repository(
        REPO,
        work,
        skip=lambda name: name.startswith(("metrics/", "plots/", "reports/")) or name == "dvc.lock",
        files={"params.yaml": yaml.safe_dump(PIPELINE, sort_keys=False)},
    )
    env = scratch_env()

    def run(*command: str) -> subprocess.CompletedProcess:
        result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
        assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return result

    run(sys.executable, "-m", "dvc", "repro")
    return work, run


def test_repro_builds_everything_then_does_nothing(workspace):
    work, run = workspace
    prepared = work / "data" / "prepared"
    for name in ("cells.csv", "images.csv", "findings.csv", "coco/train.json", "coco/val.json", "coco/test.json"):
        assert (prepared / name).is_file(), name
    data = json.loads((work / "metrics" / "data.json").read_text())
    assert data["rejected"] == 0 and set(data["counts"]) == {"acevedo", "matek", "wbc1"}
    assert data["missing_classes"]["acevedo"] == 1  # Acevedo_20 has no blasts, as in reality
    detect = json.loads((work / "metrics" / "detect.json").read_text())
    assert detect["threshold_from"] == "validation fields" and {"val", "test"} <= set(detect)
    for method in ("none", "cyclegan"):
        classify = json.loads((work / "metrics" / "classify" / f"{method}.json").read_text())
        assert classify["resolved_backbone"] == "resnet18" and classify["oof"]["cells"] > 0
        evaluation = json.loads((work / "metrics" / "evaluate" / f"{method}.json").read_text())
        wbc1 = evaluation["domains"]["wbc1"]
        assert wbc1["cells"] == len(pd.read_csv(work / "data" / "evaluated" / f"{method}.csv"))
        assert wbc1["macro_f1_interval"][0] <= wbc1["macro_f1"] <= wbc1["macro_f1_interval"][1]
        assert "cytologia" in wbc1 and "at_true_boxes" in wbc1
    adapted = json.loads((work / "metrics" / "classify" / "cyclegan.json").read_text())["adaptation"]
    assert adapted["adabn_layers"] > 0 and adapted["target_cells"] > 0 and "0" in adapted["self_training_cells"]
    table = json.loads((work / "metrics" / "cross_domain.json").read_text())
    assert set(table["macro_f1"]) == {"none", "cyclegan"} and "wbc1 (test)" in table["macro_f1"]["cyclegan"]
    assert table["deployed_method"] in {"none", "cyclegan"} and "IM" in table["deployed_because"]
    kept = json.loads((work / "metrics" / "check_translations.json").read_text())["class_kept"]
    assert set(kept) == {"untranslated", "none", "cyclegan"} and kept["none"]["kept_change"] == 0
    report = (work / "reports" / "README.md").read_text()
    assert "Cross-domain macro-F1" in report and (work / "plots" / "translate" / "domains.png").stat().st_size > 1000

    again = run(sys.executable, "-m", "dvc", "repro")
    assert "Data and pipelines are up to date" in again.stdout
    run(sys.executable, "-m", "dvc", "status", "-q", "dvc.yaml")  # data.dvc has no cache in a fresh clone


def test_a_code_change_reruns_only_the_stages_that_import_it(workspace):
    work, run = workspace
    run("git", "add", "-A")
    run("git", "commit", "-qm", "baseline")
    normalizers = work / "src" / "hemaflow" / "translate" / "normalizers.py"
    normalizers.write_text(normalizers.read_text() + "\n# an edit\n")
    stale = run(sys.executable, "-m", "dvc", "status", "dvc.yaml", "--json").stdout
    changed = set(json.loads(stale))
    assert changed == {"translate@none", "translate_cyclegan"}  # the translate stages import normalizers.py
    run("git", "checkout", "--", str(normalizers))


def test_the_users_experiment_command_and_the_diffs(workspace):
    work, run = workspace
    run("git", "add", "-A")
    run("git", "commit", "-qm", "baseline", "--allow-empty")
    run(
        sys.executable,
        "-m",
        "dvc",
        "exp",
        "run",
        "-S",
        "model.backbone=vit_large",
        "-S",
        "classify.epochs=1",
        "-S",
        "adapt.methods.cyclegan.self_training=null",  # one ViT-Large training per method, not two
        "-n",
        "vit",
    )
    metrics = json.loads((work / "metrics" / "classify" / "cyclegan.json").read_text())
    assert metrics["resolved_backbone"] == "vit_large_patch16_224"
    assert "vit_large" in run(sys.executable, "-m", "dvc", "exp", "show", "--json").stdout
    diff = run(sys.executable, "-m", "dvc", "metrics", "diff").stdout
    assert "resolved_backbone" in diff
    run(sys.executable, "-m", "dvc", "plots", "diff", "-o", "plots_html")
    assert (work / "plots_html" / "index.html").stat().st_size > 1000
