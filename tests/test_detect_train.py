"""Detector training: resume after a kill, the validation-chosen threshold, DDP on gloo, real BCCD images."""

from __future__ import annotations

import json
import os
import sys

import pandas as pd
import pytest
import yaml

from conftest import hemaflow_command, kill_when, run, shared_dataset, write_params

pytestmark = pytest.mark.slow


def _params(path, base, **detect):
    data = yaml.safe_load(base.read_text())
    data["detect"].update(detect)
    path.write_text(yaml.safe_dump(data))
    return path


def _train_command(params, prepared, root):
    return hemaflow_command(
        "train-detector",
        "--params",
        str(params),
        "--prepared",
        str(prepared),
        "--work-dir",
        str(root / "work"),
        "--out",
        str(root / "model"),
        "--plots",
        str(root / "plots"),
    )


def test_the_model_card_holds_a_threshold_chosen_on_validation_fields(tiny_models):
    card = json.loads((tiny_models.detector / "detector.json").read_text())
    assert card["status"] == "trained" and card["px_per_um"] == 4.0 and card["input_px"] == 160
    assert 0 < card["score_threshold"] <= 1 and card["fields"] == 6  # the tiny demo's validation fields
    metrics = json.loads((tiny_models.root / "detect.json").read_text())
    for split in ("val", "test"):
        assert {"mAP", "AP50", "AP50_interval", "precision_50", "recall_50", "mean_giou", "cytologia_box_term"} <= set(
            metrics[split]
        )
    columns = list(pd.read_csv(tiny_models.detections / "val.csv").columns)
    assert columns == ["image", "x1", "y1", "x2", "y2", "score"]


def test_killed_training_resumes(tiny_prepared, tmp_path):
    prepared, base = tiny_prepared
    params = _params(tmp_path / "params.yaml", base, epochs=3, batch_size=4)
    command = _train_command(params, prepared, tmp_path)
    # mmengine names a checkpoint in last_checkpoint only once it is completely written
    kill_when(command, lambda: (tmp_path / "work" / "last_checkpoint").exists())
    assert not (tmp_path / "model" / "best.safetensors").exists(), "training finished before it could be interrupted"
    run(command)
    runs = sorted((tmp_path / "work").glob("*/vis_data/scalars.json"))
    resumed = [json.loads(line) for line in runs[-1].read_text().splitlines()]
    assert len(runs) == 2 and min(r["epoch"] for r in resumed if "epoch" in r) >= 2  # continued, not restarted
    assert list(pd.read_csv(tmp_path / "plots" / "curves.csv")["epoch"]) == [1, 2, 3]


def test_torchrun_two_processes_on_gloo(tiny_prepared, tmp_path):
    prepared, base = tiny_prepared
    params = _params(tmp_path / "params.yaml", base, epochs=1, batch_size=2)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        *_train_command(params, prepared, tmp_path)[2:],
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
    run(_train_command(params, tmp_path / "prepared", tmp_path))
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
