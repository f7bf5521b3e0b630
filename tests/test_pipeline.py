"""The DVC pipeline end to end, in a throw-away copy of the repository (never the developer's)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY_DEMO

pytestmark = pytest.mark.slow


def _git_files(repo: Path) -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo, check=True, capture_output=True
    ).stdout.decode()
    return [name for name in listed.split("\0") if name and (repo / name).is_file()]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    work = tmp_path_factory.mktemp("pipeline") / "repo"
    for name in _git_files(REPO):
        if name.startswith(("metrics/", "plots/")) or name == "dvc.lock":
            continue  # start as a fresh clone would before its first run
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, work / name)
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["demo_data"].update(TINY_DEMO)
    params["prepare"]["folds"] = 2
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = os.environ | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "true",
        "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.org",
        "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.org",
    }  # fmt: skip

    def run(*command: str) -> subprocess.CompletedProcess:
        result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
        assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
        return result

    run("git", "init", "-q")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "fresh clone")
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
