"""Classifier training on the tiny demo: determinism, calibration, kill-and-resume, DDP on gloo, the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

import hemaflow
from conftest import hemaflow_command, kill_when, load, run, shared_dataset, train_tiny_classifier, write_params
from hemaflow.classify.train import fit_temperature
from hemaflow.evaluate.evaluate import evaluate

pytestmark = pytest.mark.slow


def _train_command(cells, prepared, params_file, out_root):
    return hemaflow_command(
        "train-classifier",
        "--params",
        str(params_file),
        "--method",
        "none",
        "--cells",
        str(cells),
        "--crops",
        str(cells),
        "--prepared",
        str(prepared),
        "--out",
        str(out_root / "models"),
        "--metrics",
        str(out_root / "metrics.json"),
        "--plots",
        str(out_root / "plots"),
        "--state",
        str(out_root / "state"),
    )


def _scores(path):
    metrics = json.loads(path.read_text())
    metrics.pop("train_images_per_second")
    metrics.pop("seeds")
    return metrics


def test_same_params_same_models_and_a_second_seed_measures_the_spread(tiny_models, tmp_path):
    p = load(yaml.safe_load(tiny_models.params_file.read_text()))
    seeds = [*p.base.seeds, 7]
    metrics = train_tiny_classifier(tiny_models, tmp_path, seeds=seeds)
    # the first seed's models are the pipeline's, whatever further seeds are asked for
    assert _scores(tmp_path / "metrics.json") == _scores(tiny_models.root / "classify.json")
    again, first = (
        load_file(tmp_path / "models" / "fold0.safetensors"),
        load_file(tiny_models.classifier / "fold0.safetensors"),
    )
    assert all(torch.equal(again[k], first[k]) for k in first)
    other = load_file(tmp_path / "models" / "seeds" / "seed7" / "fold0.safetensors")
    assert not all(torch.equal(other[k], first[k]) for k in first)
    spread = metrics["seeds"]["macro_f1"]
    assert set(spread["per_seed"]) == {str(s) for s in seeds} and spread["std"] is not None
    assert spread["mean"] == pytest.approx(np.mean(list(spread["per_seed"].values())))
    assert metrics["resolved_backbone"] == "resnet18" and metrics["conditions"]["cpu_kernels"] == "avx2"
    card = json.loads((tmp_path / "models" / "fold0.json").read_text())
    assert card["classes"] == sorted(card["classes"]) and card["img_size"] == 32 and card["temperature"] > 0
    confusion = pd.read_csv(tmp_path / "plots" / "confusion.csv")
    assert list(confusion.columns) == ["actual", "predicted"] and len(confusion) == metrics["oof"]["cells"]
    assert not list((tmp_path / "state").rglob("*.pt"))  # states are removed after success

    evaluate(
        method="none",
        geometry=p.prepare.crop,
        classify=p.classify,
        review_below=0.5,
        evaluation=p.evaluate,
        seed=0,
        prepared=tiny_models.prepared,
        detections=tiny_models.detections,
        classifier=tmp_path / "models",
        out=tmp_path / "cells.csv",
        metrics=tmp_path / "evaluate.json",
        plots=tmp_path / "evaluate_plots",
    )
    evaluation = json.loads((tmp_path / "evaluate.json").read_text())
    test_spread = evaluation["seeds"]["overall"]["macro_f1"]
    assert set(test_spread["per_seed"]) == {str(s) for s in seeds}
    assert test_spread["per_seed"][str(seeds[0])] == evaluation["overall"]["macro_f1"]


def test_temperature_scaling_lowers_the_error_of_an_overconfident_model():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 2000)
    right = rng.random(2000) < 0.7  # 70 % accurate...
    chosen = np.where(right, labels, (labels + rng.integers(1, 3, 2000)) % 3)
    logits = np.full((2000, 3), 0.0)
    logits[np.arange(2000), chosen] = 8.0  # ...but 99.9 % sure every time
    temperature = fit_temperature(logits, labels)
    assert temperature > 2

    def nll(t):
        return float(torch.nn.functional.cross_entropy(torch.from_numpy(logits / t), torch.from_numpy(labels)))

    from hemaflow.metrics import expected_calibration_error

    def ece(t):
        p = torch.from_numpy(logits / t).softmax(1).numpy()
        return expected_calibration_error(p.max(1), p.argmax(1) == labels)

    assert nll(temperature) < nll(1.0) and ece(temperature) < ece(1.0) / 5


def test_a_killed_run_resumes_and_ends_as_an_uninterrupted_one(tiny_models, tmp_path):
    command = _train_command(tiny_models.cells, tiny_models.prepared, tiny_models.params_file, tmp_path)
    first_seed = load(yaml.safe_load(tiny_models.params_file.read_text())).base.seeds[0]
    state = tmp_path / "state" / f"seed{first_seed}" / "fold0.state.pt"
    kill_when(command, state.exists)  # saved (atomically) after the first epoch
    resumed = run(command)
    assert "resuming after epoch 1" in resumed.stdout + resumed.stderr
    assert _scores(tmp_path / "metrics.json") == _scores(tiny_models.root / "classify.json")  # the uninterrupted run


def test_a_state_written_by_other_code_is_not_resumed(tmp_path):
    # the state key covers hemaflow's source: a run killed before a code change starts over,
    # rather than mixing epochs trained by the old code into a model the new code reports
    copy = tmp_path / "src" / "hemaflow"
    shutil.copytree(Path(hemaflow.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    probe = "import hemaflow.resume as r; print(r.__file__, r.fingerprint({'epochs': 6}, 0))"

    def key() -> str:
        env = {**os.environ, "PYTHONPATH": str(tmp_path / "src")}
        printed = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
        where, fingerprint = printed.stdout.split()
        assert Path(where).is_relative_to(copy)  # the copy is the code that runs
        return fingerprint

    before = key()
    assert key() == before  # the same code: the same key, so an interrupted run resumes
    with (copy / "classify" / "train.py").open("a") as source:
        source.write("# a change\n")
    assert key() != before


def test_torchrun_two_processes_on_gloo(tiny_models, tmp_path):
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        *_train_command(tiny_models.cells, tiny_models.prepared, tiny_models.params_file, tmp_path)[2:],
    ]
    run(command, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert (tmp_path / "models" / "fold0.safetensors").exists()
    assert json.loads((tmp_path / "metrics.json").read_text())["oof"]["cells"] > 0


def test_classify_cli_writes_a_calibrated_class_per_image(tiny_models, tmp_path):
    cells = pd.read_csv(tiny_models.prepared / "cells.csv", keep_default_na=False)
    originals = list(cells.loc[cells["dataset"] == "matek", "image"].head(3))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    result = run(
        hemaflow_command(
            "classify",
            *originals,
            str(tmp_path / "broken.png"),
            "--models",
            str(tiny_models.classifier),
            "--px-per-um",
            "13.8",
            "--out",
            str(tmp_path / "classes.csv"),
            "--params",
            str(tiny_models.params_file),
        )
    )
    assert "4 images classified" in result.stdout
    table = pd.read_csv(tmp_path / "classes.csv")
    table["error"] = table["error"].fillna("")
    card = json.loads((tiny_models.classifier / "fold0.json").read_text())
    assert set(table.loc[table["error"] == "", "class"]) <= set(card["classes"]) and (table["error"] == "").sum() == 3
    assert table.loc[table["image"].str.endswith("broken.png"), "error"].str.startswith("unreadable_image").all()
    probabilities = table.loc[table["error"] == "", [f"p_{c}" for c in card["classes"]]].sum(axis=1)
    assert ((probabilities - 1).abs() < 1e-4).all()


def test_real_acevedo_cells_train_end_to_end(tmp_path):
    source = shared_dataset("acevedo20_subset")
    subset = tmp_path / "raw" / "pbc"
    for folder in sorted(p for p in source.iterdir() if p.is_dir()):
        (subset / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[:6]:
            (subset / folder.name / image.name).write_bytes(image.read_bytes())
    params = write_params(
        tmp_path / "params.yaml",
        {
            "prepare": {
                "root": str(tmp_path / "raw"),
                "folds": 2,
                "workers": 0,
                "datasets": [
                    {"name": "pbc", "format": "acevedo20", "path": "pbc", "role": "source", "px_per_um": 10.0}
                ],
            },
            "model": {"img_size": 32},
            "classify": {"folds": 1, "epochs": 1, "batch_size": 8},
        },
    )
    common = ("--params", str(params))
    run(
        hemaflow_command(
            "prepare",
            *common,
            "--out",
            str(tmp_path / "prepared"),
            "--metrics",
            str(tmp_path / "data.json"),
            "--plots",
            str(tmp_path / "p"),
        )
    )
    run(
        hemaflow_command(
            "crop",
            *common,
            "--prepared",
            str(tmp_path / "prepared"),
            "--detections",
            str(tmp_path / "none"),
            "--out",
            str(tmp_path / "crops"),
            "--metrics",
            str(tmp_path / "crop.json"),
        )
    )
    run(_train_command(tmp_path / "crops", tmp_path / "prepared", params, tmp_path / "run"))
    card = json.loads((tmp_path / "run" / "models" / "fold0.json").read_text())
    assert {"platelet", "erythroblast", "monocyte", "neutrophil_banded"} <= set(card["classes"])
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["oof"]["cells"] > 0
