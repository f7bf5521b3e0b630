"""Detector training, resume after a kill, and detection on tiny demo and real BCCD images."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

from conftest import REPO, shared_dataset

pytestmark = pytest.mark.slow


def _params(path, base, **detect):
    data = yaml.safe_load(base.read_text())
    data["detect"].update(detect)
    path.write_text(yaml.safe_dump(data))
    return path


def _train_command(params, prepared, root):
    return [sys.executable, "-m", "hemaflow", "train-detector", "--params", str(params), "--prepared", str(prepared),
            "--work-dir", str(root / "work"), "--out", str(root / "model"), "--plots", str(root / "plots")]  # fmt: skip


def _run(command):
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_killed_training_resumes_and_detections_are_scored(tiny_prepared, tmp_path):
    prepared, base = tiny_prepared
    params = _params(tmp_path / "params.yaml", base, epochs=3, batch_size=4)
    command = _train_command(params, prepared, tmp_path)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    # mmengine names a checkpoint in last_checkpoint only once it is completely written
    while time.time() < deadline and process.poll() is None and not (tmp_path / "work" / "last_checkpoint").exists():
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
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


def test_real_bccd_images_through_import_prepare_train_and_detect(tmp_path):
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
