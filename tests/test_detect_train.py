"""Detector training: resume after a kill, the validation-chosen threshold, DDP on gloo, real BCCD images."""

from __future__ import annotations

import json
import os
import shutil
import sys

import pandas as pd
import pytest
import yaml

from conftest import (
    detector_params,
    hemaflow_command,
    kill_when,
    run,
    shared_dataset,
    train_detector_command,
    write_params,
)
from hemaflow.tables import read_cells, read_images, write_cells

pytestmark = pytest.mark.slow


def test_the_model_card_holds_a_threshold_chosen_on_validation_fields(tiny_models):
    card = json.loads((tiny_models.detector / "detector.json").read_text())
    assert card["status"] == "trained" and card["px_per_um"] == 4.0 and card["input_px"] == 160
    images = read_images(tiny_models.prepared)
    assert 0 < card["score_threshold"] <= 1
    assert card["fields"] == len(images[(images["split"] == "val") & (images["field"] != "")])
    metrics = json.loads((tiny_models.root / "detect.json").read_text())
    for split in ("val", "test"):
        assert {"mAP", "AP50", "AP50_interval", "precision_50", "recall_50", "mean_giou", "cytologia_box_term"} <= set(
            metrics[split]
        )
    columns = list(pd.read_csv(tiny_models.detections / "val.csv").columns)
    assert columns == ["image", "x1", "y1", "x2", "y2", "score"]


def _move_boxes(prepared, destination, split: str):
    """A copy of ``prepared`` whose ``split`` fields have every true box moved."""
    shutil.copytree(prepared, destination)
    images, cells = read_images(destination), read_cells(destination)
    fields = set(images[(images["split"] == split) & (images["field"] != "")]["image"])
    chosen = cells["image"].isin(fields)
    for column in ("x1", "x2"):
        cells.loc[chosen, column] = (pd.to_numeric(cells.loc[chosen, column]) + 37).astype(str)
    write_cells(destination, cells)
    return destination


def test_the_threshold_sees_the_validation_fields_and_never_the_test_ones(tiny_models, tmp_path):
    from hemaflow.detect.train import validation_threshold
    from hemaflow.params import load_params

    detect = load_params(tiny_models.params_file).detect
    card = json.loads((tiny_models.detector / "detector.json").read_text())
    other_test = _move_boxes(tiny_models.prepared, tmp_path / "test", "test")
    chosen = validation_threshold(tiny_models.detector, other_test, detect, detect.batch_size)
    assert (chosen["score_threshold"], chosen["f1_50"]) == (card["score_threshold"], card["f1_50"])
    other_val = _move_boxes(tiny_models.prepared, tmp_path / "val", "val")
    assert validation_threshold(tiny_models.detector, other_val, detect, detect.batch_size)["f1_50"] < card["f1_50"]


def test_killed_training_resumes_and_a_second_seed_measures_the_spread(tiny_prepared, tmp_path):
    from hemaflow.detect.train import last_checkpoint

    prepared, base = tiny_prepared
    first = yaml.safe_load(base.read_text())["base"]["seeds"][0]
    second = first + 1
    params = detector_params(tmp_path / "params.yaml", base, seeds=[first, second], epochs=3, batch_size=4)
    command = train_detector_command(params, prepared, tmp_path)
    work = tmp_path / "work" / f"seed{first}"
    kill_when(command, lambda: last_checkpoint(work) is not None)  # killed after a whole checkpoint
    assert not (tmp_path / "model" / "best.safetensors").exists(), "training finished before it could be interrupted"
    run(command)
    runs = sorted(work.glob("*/vis_data/scalars.json"))
    resumed = [json.loads(line) for line in runs[-1].read_text().splitlines()]
    assert len(runs) == 2 and min(r["epoch"] for r in resumed if "epoch" in r) >= 2  # continued, not restarted
    assert list(pd.read_csv(tmp_path / "plots" / "curves.csv")["epoch"]) == [1, 2, 3]
    other = json.loads((tmp_path / "model" / "seeds" / f"seed{second}" / "detector.json").read_text())
    assert other["seed"] == second and 0 < other["score_threshold"] <= 1

    run(
        hemaflow_command(
            "detect",
            "--params",
            str(params),
            "--prepared",
            str(prepared),
            "--model",
            str(tmp_path / "model"),
            "--out",
            str(tmp_path / "detections"),
            "--metrics",
            str(tmp_path / "detect.json"),
        )
    )
    metrics = json.loads((tmp_path / "detect.json").read_text())
    spread = metrics["seeds"]["test_AP50"]
    assert set(spread["per_seed"]) == {str(first), str(second)} and spread["std"] is not None
    assert spread["per_seed"][str(first)] == pytest.approx(metrics["test"]["AP50"])


def test_torchrun_two_processes_on_gloo(tiny_prepared, tmp_path):
    prepared, base = tiny_prepared
    params = detector_params(tmp_path / "params.yaml", base, epochs=1, batch_size=2)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        *train_detector_command(params, prepared, tmp_path)[2:],
    ]
    run(command, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert (tmp_path / "model" / "best.safetensors").exists()
    config = json.loads((tmp_path / "model" / "detector.json").read_text())["config"]
    assert config["launcher"] == "pytorch" and config["env_cfg"]["dist_cfg"]["backend"] == "gloo"


def test_real_bccd_images_through_prepare_train_and_predict(tiny_models, tmp_path):
    source = shared_dataset("bccd")
    raw = tmp_path / "raw" / "bccd"
    names = sorted(source.joinpath("ImageSets", "Main", "train.txt").read_text().split())[:12]
    for folder, suffix in (("JPEGImages", ".jpg"), ("Annotations", ".xml")):
        (raw / folder).mkdir(parents=True)
        for name in names:
            (raw / folder / f"{name}{suffix}").write_bytes((source / folder / f"{name}{suffix}").read_bytes())
    params = write_params(
        tmp_path / "params.yaml",
        {
            "prepare": {
                "root": str(tmp_path / "raw"),
                "folds": 2,
                "workers": 0,
                "datasets": [{"name": "bccd", "format": "bccd", "path": "bccd", "role": "source", "px_per_um": 16.0}],
            },
            "detect": {"epochs": 1, "batch_size": 4},
            "model": {"img_size": 32},
        },
    )
    run(
        hemaflow_command(
            "prepare",
            "--params",
            str(params),
            "--out",
            str(tmp_path / "prepared"),
            "--metrics",
            str(tmp_path / "data.json"),
            "--plots",
            str(tmp_path / "p"),
        )
    )
    run(train_detector_command(params, tmp_path / "prepared", tmp_path))
    images = [str(raw / "JPEGImages" / f"{n}.jpg") for n in names[:3]]
    result = run(
        hemaflow_command(
            "predict",
            *images,
            "--px-per-um",
            "16",
            "--params",
            str(params),
            "--detector",
            str(tmp_path / "model"),
            "--classifier",
            str(tiny_models.classifier),
            "--out",
            str(tmp_path / "predictions.csv"),
            "--annotated",
            str(tmp_path / "annotated"),
        )
    )
    assert "3 images" in result.stdout
    predictions = pd.read_csv(tmp_path / "predictions.csv", keep_default_na=False)
    assert list(predictions.columns[:6]) == ["NAME", "x1", "y1", "x2", "y2", "class"]
    assert set(predictions["NAME"]) <= {f"{n}.jpg" for n in names[:3]}
    assert ((predictions["x2"] <= 640) & (predictions["y2"] <= 480) & (predictions["x1"] >= 0)).all()
    classes = json.loads((tiny_models.classifier / "fold0.json").read_text())["classes"]
    assert set(predictions["class"]) <= set(classes)
    assert len(list((tmp_path / "annotated").glob("*.jpg"))) == 3
