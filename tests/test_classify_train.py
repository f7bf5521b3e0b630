"""Training end to end on a tiny demo: determinism, kill-and-resume, DDP on gloo, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
import yaml

from conftest import kill_when

pytestmark = pytest.mark.slow


def _train(prepared, params_file, out_root, extra=(), timeout=600):
    command = [sys.executable, "-m", "hemaflow", "train-classifier", "--params", str(params_file), "--cells", str(prepared),
               "--out", str(out_root / "models"), "--metrics", str(out_root / "metrics.json"),
               "--plots", str(out_root / "plots"), "--state", str(out_root / "state"), *extra]  # fmt: skip
    return command


def _run(command, **kwargs):
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def _scores(out_root):
    metrics = json.loads((out_root / "metrics.json").read_text())
    metrics.pop("train_images_per_second")
    return metrics


def test_same_params_same_metrics_and_outputs(tiny_prepared, tmp_path):
    prepared, params_file = tiny_prepared
    _run(_train(prepared, params_file, tmp_path / "a"))
    _run(_train(prepared, params_file, tmp_path / "b"))
    assert _scores(tmp_path / "a") == _scores(tmp_path / "b")
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["resolved_backbone"] == "resnet18" and 0 <= metrics["oof"]["macro_f1"] <= 1
    assert {"macro_f1", "coarse_macro_f1"} <= set(metrics["test"])
    card = json.loads((tmp_path / "a" / "models" / "fold0.json").read_text())
    assert card["classes"] == sorted(card["classes"]) and card["img_size"] == 32
    confusion = pd.read_csv(tmp_path / "a" / "plots" / "confusion.csv")
    assert list(confusion.columns) == ["actual", "predicted"] and len(confusion) > 0
    assert not list((tmp_path / "a" / "state").iterdir())  # states are removed after success


def test_a_killed_run_resumes_and_ends_as_an_uninterrupted_one(tiny_prepared, tmp_path):
    prepared, params_file = tiny_prepared
    params = yaml.safe_load(params_file.read_text())
    params["classify"]["epochs"] = 12
    longer = tmp_path / "params.yaml"
    longer.write_text(yaml.safe_dump(params))
    _run(_train(prepared, longer, tmp_path / "whole"))

    command = _train(prepared, longer, tmp_path / "killed")
    state = tmp_path / "killed" / "state" / "fold0.state.pt"
    kill_when(command, lambda: state.exists() and torch.load(state, weights_only=True)["epoch"] >= 2)
    resumed = _run(command)
    assert "resuming after epoch" in resumed.stdout + resumed.stderr
    assert _scores(tmp_path / "killed") == _scores(tmp_path / "whole")


def test_torchrun_two_processes_on_gloo(tiny_prepared, tmp_path):
    prepared, params_file = tiny_prepared
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               *_train(prepared, params_file, tmp_path)[2:]]  # fmt: skip
    _run(command, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert (tmp_path / "models" / "fold0.safetensors").exists()
    assert json.loads((tmp_path / "metrics.json").read_text())["oof"]["macro_f1"] >= 0


def test_classify_cli_writes_a_class_per_image(tiny_prepared, tmp_path):
    prepared, params_file = tiny_prepared
    _run(_train(prepared, params_file, tmp_path))
    cells = pd.read_csv(prepared / "cells.csv", keep_default_na=False)
    originals = [p for p in cells.loc[cells["dataset"] == "matek", "image"].head(3)]
    (tmp_path / "broken.png").write_bytes(b"not an image")
    result = _run([sys.executable, "-m", "hemaflow", "classify", *originals, str(tmp_path / "broken.png"),
                   "--models", str(tmp_path / "models"), "--px-per-um", "13.8", "--out", str(tmp_path / "classes.csv"),
                   "--params", str(params_file)])  # fmt: skip
    assert "4 images classified" in result.stdout
    table = pd.read_csv(tmp_path / "classes.csv")
    table["error"] = table["error"].fillna("")
    card = json.loads((tmp_path / "models" / "fold0.json").read_text())
    assert set(table.loc[table["error"] == "", "class"]) <= set(card["classes"]) and (table["error"] == "").sum() == 3
    assert table.loc[table["image"].str.endswith("broken.png"), "error"].str.startswith("unreadable_image").all()
    probabilities = table.loc[table["error"] == "", [f"p_{c}" for c in card["classes"]]].sum(axis=1)
    assert ((probabilities - 1).abs() < 1e-4).all()


def test_real_acevedo_cells_train_end_to_end(tmp_path):
    from conftest import REPO, shared_dataset

    source = shared_dataset("acevedo20_subset")
    subset = tmp_path / "raw" / "pbc"
    for folder in sorted(p for p in source.iterdir() if p.is_dir()):
        (subset / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[:6]:
            (subset / folder.name / image.name).write_bytes(image.read_bytes())
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["prepare"].update(root=str(tmp_path / "raw"), folds=2, datasets=[
        {"name": "pbc", "format": "acevedo20", "path": "pbc", "role": "source", "px_per_um": 10.0}])  # fmt: skip
    params["model"]["img_size"] = 32
    params["classify"].update(folds=1, epochs=1, batch_size=8)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    _run([sys.executable, "-m", "hemaflow", "prepare", "--params", str(tmp_path / "params.yaml"),
          "--out", str(tmp_path / "prepared"), "--metrics", str(tmp_path / "data.json"), "--plots", str(tmp_path / "p")])  # fmt: skip
    _run(_train(tmp_path / "prepared", tmp_path / "params.yaml", tmp_path / "run"))
    card = json.loads((tmp_path / "run" / "models" / "fold0.json").read_text())
    assert {"platelet", "erythroblast", "monocyte", "neutrophil_banded"} <= set(card["classes"])
    assert 0 <= json.loads((tmp_path / "run" / "metrics.json").read_text())["oof"]["macro_f1"] <= 1
