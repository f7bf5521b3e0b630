"""Classifier heads on real cells: fine-tune, linear probe and kNN from one starting point, timed in one run.

On the Acevedo_20 subset of ../shared/data (1,200 cells, 11 classes), with params.yaml's classifier
budget (model, epochs, folds), each head starts from the same weights (``--start``: a
``hemaflow weights get`` folder or file; default a fixed random initialisation, since real pretrained
weights cannot be fetched offline) and reports its out-of-fold macro-F1 with a 95 % bootstrap
interval over cells and its training seconds. Usage:
`uv run python benchmarks/heads.py [--start models/pretrained/dinobloom_s] [--backbone dinobloom_s]`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
import yaml
from safetensors.torch import save_file

from hemaflow.classify.model import create_classifier
from hemaflow.metrics import bootstrap_interval, classification_metrics
from hemaflow.params import ModelParams

REPO = Path(__file__).resolve().parents[1]
ACEVEDO = REPO.parent / "shared" / "data" / "acevedo20_subset"


def _hemaflow(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "hemaflow", *args], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"hemaflow {args[0]}: {done.stderr.strip().splitlines()[-1]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--start", type=Path, help="pretrained weights (default: one fixed random initialisation)")
    parser.add_argument("--backbone", default=None, help="model.backbone (default: params.yaml's)")
    parser.add_argument("--heads", nargs="+", default=["finetune", "linear_probe", "knn"])
    args = parser.parse_args()
    if not ACEVEDO.is_dir():
        print(f"{ACEVEDO}: the real Acevedo_20 subset is not here; nothing measured")
        return
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    backbone = args.backbone or params["model"]["backbone"]
    work = Path(tempfile.mkdtemp(prefix="heads-"))
    start = args.start
    if start is None:  # every head from the same random weights
        torch.manual_seed(0)
        start = work / "random_start.safetensors"
        model, _ = create_classifier(ModelParams(**params["model"] | {"backbone": backbone}), num_classes=1)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, start)
    dataset = {"name": "acevedo", "format": "acevedo20", "path": str(ACEVEDO), "role": "source", "px_per_um": 10.0}
    params["prepare"] |= {"root": "/", "datasets": [dataset]}
    params["translate"]["methods"] = ["none"]  # a labelled source alone: no target, no adaptation
    params["adapt"] |= {"methods": {"none": params["adapt"]["methods"]["none"]}, "deploy": "none"}
    params["model"] |= {"backbone": backbone, "checkpoint": str(start)}
    rows = []
    for head in args.heads:
        params["classify"]["head"] = head
        (work / "params.yaml").write_text(yaml.safe_dump(params))
        common = ("--params", str(work / "params.yaml"))
        if not (work / "crops").exists():
            _hemaflow(
                "prepare",
                *common,
                "--out",
                str(work / "prepared"),
                "--metrics",
                str(work / "data.json"),
                "--plots",
                str(work / "p"),
            )
            _hemaflow(
                "crop",
                *common,
                "--prepared",
                str(work / "prepared"),
                "--detections",
                str(work / "none"),
                "--out",
                str(work / "crops"),
                "--metrics",
                str(work / "crop.json"),
            )
        out = work / head
        tick = time.perf_counter()
        _hemaflow(
            "train-classifier",
            *common,
            "--method",
            "none",
            "--cells",
            str(work / "crops"),
            "--crops",
            str(work / "crops"),
            "--prepared",
            str(work / "prepared"),
            "--out",
            str(out / "models"),
            "--metrics",
            str(out / "metrics.json"),
            "--plots",
            str(out / "plots"),
            "--state",
            str(out / "state"),
        )
        seconds = time.perf_counter() - tick
        oof = pd.read_csv(out / "models" / "oof.csv")
        truth, predicted = oof["fine_class"].to_numpy(), oof["predicted"].to_numpy()
        low, high = bootstrap_interval(
            lambda i, truth=truth, predicted=predicted: classification_metrics(list(truth[i]), list(predicted[i]))[
                "macro_f1"
            ],
            list(range(len(oof))),
            1000,
            0.95,
            0,
        )
        metrics = json.loads((out / "metrics.json").read_text())
        rows.append(
            {
                "head": head,
                "oof macro-F1": round(metrics["oof"]["macro_f1"], 4),
                "95 % CI": f"[{low:.4f}, {high:.4f}]",
                "cells": len(oof),
                "train s (all folds, incl. start-up)": round(seconds, 1),
                "train images/s": metrics["train_images_per_second"],
            }
        )
    print(
        f"start: {metrics['pretrained']}  backbone: {backbone}  epochs: {params['classify']['epochs']}  "
        f"folds: {params['classify']['folds']}  img_size: {params['model']['img_size']}"
    )
    print(pd.DataFrame(rows).to_markdown(index=False))


if __name__ == "__main__":
    main()
