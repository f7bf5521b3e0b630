"""Classifier throughput: training images/s, the data pipeline's share of a step, inference with TTA.

Reads the crops of `data/prepared` (run `make demo` first). Usage:
`uv run python benchmarks/classify.py [--img-size 224] [--steps 6] [--device cpu|cuda]`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import DataLoader

from hemaflow.classify.data import CellDataset, build_transform
from hemaflow.classify.inference import predict_logits
from hemaflow.classify.model import create_classifier
from hemaflow.params import load_params

REPO = Path(__file__).resolve().parents[1]


def _loader(paths, card, augment, batch, workers):
    dataset = CellDataset(paths, [0] * len(paths), build_transform(card.img_size, card.mean, card.std, augment))
    return DataLoader(dataset, batch, shuffle=False, num_workers=workers, drop_last=True)


def _data_seconds_per_batch(loader, steps):
    iterator = iter(loader)
    next(iterator)  # worker start-up is not per-batch cost
    tick = time.perf_counter()
    for _ in range(steps):
        next(iterator)
    return (time.perf_counter() - tick) / steps


def _model_seconds_per_step(model, batch, img_size, steps, device, amp):
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    images = torch.rand(batch, 3, img_size, img_size, device=device)
    labels = torch.randint(0, 6, (batch,), device=device)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
        model = model.to(memory_format=torch.channels_last)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = torch.nn.functional.cross_entropy(model(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    tick = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - tick) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbones", nargs="+", default=["resnet18", "vit_small_patch16_224"])
    args = parser.parse_args()
    device = torch.device(args.device)
    params = load_params(REPO / "params.yaml")
    cells = pd.read_csv(REPO / "data" / "prepared" / "cells.csv", keep_default_na=False)
    paths = [REPO / "data" / "prepared" / p for p in cells["crop"]][: args.batch * (args.steps + 1)]
    print(f"device {device}, batch {args.batch}, input {args.img_size} px, {torch.get_num_threads()} threads\n")
    print(
        "| backbone | train img/s (model only) | data pipeline s/batch | data share of step | infer img/s | infer img/s with hflip TTA |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for backbone in args.backbones:
        model_params = params.model.model_copy(update={"backbone": backbone, "img_size": args.img_size})
        model, card = create_classifier(model_params, num_classes=6)
        model.to(device).train()
        step = _model_seconds_per_step(model, args.batch, args.img_size, args.steps, device, device.type == "cuda")
        data = _data_seconds_per_batch(
            _loader(paths, card, params.classify.augment, args.batch, args.workers), args.steps
        )
        plain = _loader(paths, card, None, args.batch, args.workers)
        speeds = []
        for tta in ([], ["hflip"]):
            predict_logits(model, plain, device, tta)  # warm-up
            tick = time.perf_counter()
            predict_logits(model, plain, device, tta)
            speeds.append(len(plain) * args.batch / (time.perf_counter() - tick))
        print(
            f"| {backbone} | {args.batch / step:.1f} | {data:.3f} | {data / step:.1%} | {speeds[0]:.1f} | {speeds[1]:.1f} |"
        )


if __name__ == "__main__":
    main()
