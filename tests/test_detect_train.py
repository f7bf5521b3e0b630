"""Detector training, resume after a kill, and detection on tiny demo and real BCCD images."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from conftest import REPO, kill_when, shared_dataset

pytestmark = pytest.mark.slow


def _params(path, base, **detect):
    data = yaml.safe_load(base.read_text())
    data["detect"].update(detect)
    path.write_text(yaml.safe_dump(data))
    return path


def _train_command(params, prepared, root):
    return [sys.executable, "-m", "hemaflow", "train-detector", "--params", str(params), "--prepared", str(prepared),
            "--work-dir", str(root / "work"), "--out", str(root / "model"), "--plots", str(root / "plots")]  # fmt: skip


def _run(command, **kwargs):
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, **kwargs)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_killed_training_resumes_and_detections_are_scored(tiny_prepared, tmp_path):
    prepared, base = tiny_prepared
    params = _params(tmp_path / "params.yaml", base, epochs=3, batch_size=4)
    command = _train_command(params, prepared, tmp_path)
    # mmengine names a checkpoint in last_checkpoint only once it is completely written
    kill_when(command, lambda: (tmp_path / "work" / "last_checkpoint").exists())
    assert not (tmp_path / "model" / "best.safetensors").exists(), "training finished before it could be interrupted"
    _run(command)
    runs = sorted((tmp_path / "work").glob("*/vis_data/scalars.json"))
    resumed = [json.loads(line) for line in runs[-1].read_text().splitlines()]
    assert len(runs) == 2 and min(r["epoch"] for r in resumed if "epoch" in r) >= 2  # continued, not restarted
    curves = pd.read_csv(tmp_path / "plots" / "curves.csv")
    assert list(curves["epoch"]) == [1, 2, 3]

    _run([sys.executable, "-m", "hemaflow", "detect-splits", "--params", str(params), "--prepared", str(prepared),
          "--model", str(tmp_path / "model"), "--out", str(tmp_path / "detections"),
          "--metrics", str(tmp_path / "detect.json")])  # fmt: skip
    metrics = json.loads((tmp_path / "detect.json").read_text())
    for split in ("val", "test"):
        assert {"mAP", "AP50", "AP75", "recall_50", "mean_giou", "cytologia_box_term"} <= set(metrics[split])
    assert list(pd.read_csv(tmp_path / "detections" / "val.csv").columns) == ["image", "x1", "y1", "x2", "y2", "score"]


def test_torchrun_two_processes_on_gloo(tiny_prepared, tmp_path):
    prepared, base = tiny_prepared
    params = _params(tmp_path / "params.yaml", base, epochs=1, batch_size=2)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               *_train_command(params, prepared, tmp_path)[2:]]  # fmt: skip
    _run(command, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert (tmp_path / "model" / "best.safetensors").exists()
    config = json.loads((tmp_path / "model" / "best.json").read_text())["config"]
    assert config["launcher"] == "pytorch" and config["env_cfg"]["dist_cfg"]["backend"] == "gloo"


def test_real_bccd_images_through_import_prepare_train_detect_and_predict(tmp_path):
    source = shared_dataset("bccd")
    raw = tmp_path / "raw" / "bccd"
    names = sorted(source.joinpath("ImageSets", "Main", "train.txt").read_text().split())[:12]
    for folder, suffix in (("JPEGImages", ".jpg"), ("Annotations", ".xml")):
        (raw / folder).mkdir(parents=True)
        for name in names:
            (raw / folder / f"{name}{suffix}").write_bytes((source / folder / f"{name}{suffix}").read_bytes())
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["prepare"].update(root=str(tmp_path / "raw"), folds=2, datasets=[
        {"name": "bccd", "format": "bccd", "path": "bccd", "role": "source", "px_per_um": 16.0}])  # fmt: skip
    data["detect"].update(epochs=1, batch_size=4)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(data))
    _run([sys.executable, "-m", "hemaflow", "prepare", "--params", str(params), "--out", str(tmp_path / "prepared"),
          "--metrics", str(tmp_path / "data.json"), "--plots", str(tmp_path / "p")])  # fmt: skip
    _run(_train_command(params, tmp_path / "prepared", tmp_path))
    images = [str(raw / "JPEGImages" / f"{n}.jpg") for n in names[:3]]
    result = _run([sys.executable, "-m", "hemaflow", "detect", *images, "--px-per-um", "16", "--params", str(params),
                   "--model", str(tmp_path / "model"), "--out", str(tmp_path / "boxes.csv")])  # fmt: skip
    assert "boxes ->" in result.stdout
    boxes = pd.read_csv(tmp_path / "boxes.csv")
    assert list(boxes.columns) == ["image", "x1", "y1", "x2", "y2", "score"]
    assert ((boxes["x2"] <= 640) & (boxes["y2"] <= 480) & (boxes["x1"] >= 0)).all()

    # hemaflow predict: this detector + a classifier trained on a few real Acevedo_20 cells
    acevedo = shared_dataset("acevedo20_subset")
    for folder in sorted(p for p in acevedo.iterdir() if p.is_dir()):
        (tmp_path / "raw" / "pbc" / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[:4]:
            (tmp_path / "raw" / "pbc" / folder.name / image.name).write_bytes(image.read_bytes())
    data["prepare"]["datasets"] = [{"name": "pbc", "format": "acevedo20", "path": "pbc", "role": "source", "px_per_um": 10.0}]
    data["model"]["img_size"] = 32
    data["classify"].update(folds=1, epochs=1, batch_size=8)
    cells_params = tmp_path / "cells_params.yaml"
    cells_params.write_text(yaml.safe_dump(data))
    _run([sys.executable, "-m", "hemaflow", "prepare", "--params", str(cells_params), "--out", str(tmp_path / "cells"),
          "--metrics", str(tmp_path / "cells.json"), "--plots", str(tmp_path / "cp")])  # fmt: skip
    _run([sys.executable, "-m", "hemaflow", "train-classifier", "--params", str(cells_params), "--cells", str(tmp_path / "cells"),
          "--out", str(tmp_path / "classifier"), "--metrics", str(tmp_path / "classify.json"),
          "--plots", str(tmp_path / "cls_plots"), "--state", str(tmp_path / "state")])  # fmt: skip
    result = _run([sys.executable, "-m", "hemaflow", "predict", *images, "--px-per-um", "16", "--params", str(cells_params),
                   "--detector", str(tmp_path / "model"), "--classifier", str(tmp_path / "classifier"),
                   "--out", str(tmp_path / "predictions.csv"), "--annotated", str(tmp_path / "annotated")])  # fmt: skip
    assert "3 images" in result.stdout
    predictions = pd.read_csv(tmp_path / "predictions.csv")
    assert list(predictions.columns[:6]) == ["NAME", "x1", "y1", "x2", "y2", "class"]
    assert set(predictions["NAME"]) <= {f"{n}.jpg" for n in names[:3]}
    classes = json.loads((tmp_path / "classifier" / "fold0.json").read_text())["classes"]
    assert set(predictions["class"]) <= set(classes)
    assert len(list((tmp_path / "annotated").glob("*.jpg"))) == 3
