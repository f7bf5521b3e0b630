"""The ``train_classifier`` stage: k-fold timm classifiers on prepared cell crops.

For each of ``classify.folds`` folds, the labelled source cells of the other folds train a model
and the held-out fold gives out-of-fold (OOF) predictions; the fold models together are the
ensemble that ``hemaflow classify`` and the evaluation use. AdamW with a warm-up + cosine
schedule (timm), albumentations, optional mixup/cutmix, class-balanced sampling or loss weights,
bf16/fp16 autocast and channels_last on GPU, deterministic on CPU. Training state is saved after
every epoch into a state folder outside the DVC output, and a rerun resumes it when params and
data are unchanged (``fold<k>.state.pt``: tensors and plain values only, loaded with
``weights_only=True``); the states are removed once every fold model is written. Under ``torchrun`` the model
runs in DistributedDataParallel (NCCL on GPU, gloo on CPU).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from hemaflow._io import write_csv, write_json
from hemaflow.classify.data import CellDataset, EpochSampler, build_transform, class_weights
from hemaflow.classify.model import ModelCard, create_classifier, resolve_backbone, save_classifier
from hemaflow.classify.predict import load_ensemble, predict_crops, predict_probabilities
from hemaflow.data.classes import load_class_matrix
from hemaflow.errors import HemaflowError
from hemaflow.metrics import classification_metrics
from hemaflow.params import Balance, ClassifyParams, ModelParams, Precision

__all__ = ["train_classifier"]


@dataclass(frozen=True)
class _Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def _runtime(choice: str) -> _Runtime:
    """The device and, under torchrun, the process group (NCCL on GPU, gloo on CPU)."""
    cuda = torch.cuda.is_available() if choice == "auto" else choice == "cuda"
    if cuda and not torch.cuda.is_available():
        raise HemaflowError("classify.device: cuda requested but no GPU is visible")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return _Runtime(torch.device("cuda" if cuda else "cpu"))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    return _Runtime(torch.device(f"cuda:{local_rank}" if cuda else "cpu"), dist.get_rank(), world_size)


def _fingerprint(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _autocast(runtime: _Runtime, precision: Precision) -> torch.autocast:
    cuda = runtime.device.type == "cuda"
    dtype = {Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16}.get(precision, torch.float32)
    return torch.autocast(runtime.device.type, dtype=dtype, enabled=cuda and precision is not Precision.fp32)


def _save_state(path: Path, state: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _fit_fold(
    fold: int,
    train: pd.DataFrame,
    val: pd.DataFrame,
    classes: list[str],
    model_params: ModelParams,
    params: ClassifyParams,
    seed: int,
    cells_dir: Path,
    state_dir: Path,
    fingerprint: str,
    runtime: _Runtime,
) -> tuple[nn.Module, ModelCard, list[dict], float | None]:
    """Train one fold (resuming a matching saved state); return model, card, history, images/s."""
    torch.manual_seed(seed + fold)
    index = {c: i for i, c in enumerate(classes)}
    model, card = create_classifier(model_params, len(classes))
    card = replace(card, classes=classes)
    cuda = runtime.device.type == "cuda"
    model.to(runtime.device, memory_format=torch.channels_last if cuda and params.channels_last else torch.preserve_format)
    train_labels = [index[c] for c in train["fine_class"]]
    augment = build_transform(card.img_size, card.mean, card.std, params.augment)
    plain = build_transform(card.img_size, card.mean, card.std, None)
    train_set = CellDataset([cells_dir / p for p in train["crop"]], train_labels, augment)
    val_set = CellDataset([cells_dir / p for p in val["crop"]], [index[c] for c in val["fine_class"]], plain)
    weights = class_weights(train_labels, len(classes))
    sample_weights = weights[train_labels] if params.balance is Balance.sampler else None
    sampler = EpochSampler(len(train_set), seed + fold, sample_weights, runtime.rank, runtime.world_size)
    per_process_batch = max(params.batch_size // runtime.world_size, 2)
    loader = DataLoader(train_set, per_process_batch, sampler=sampler, num_workers=params.num_workers,
                        drop_last=True, pin_memory=cuda, persistent_workers=params.num_workers > 0)  # fmt: skip
    val_loader = DataLoader(val_set, 2 * per_process_batch, num_workers=params.num_workers)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise HemaflowError(f"classify: fold {fold} has {len(train_set)} training cells, fewer than one batch")
    optimizer = create_optimizer_v2(model, "adamw", lr=params.lr, weight_decay=params.weight_decay)
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=params.epochs * steps_per_epoch,
        lr_min=params.lr * 0.01,
        warmup_t=round(params.warmup_epochs * steps_per_epoch),
        warmup_lr_init=params.lr * 0.01,
        t_in_epochs=False,
    )
    mixing = params.augment.mixup_alpha > 0 or params.augment.cutmix_alpha > 0
    mixup = Mixup(params.augment.mixup_alpha, params.augment.cutmix_alpha, label_smoothing=params.label_smoothing,
                  num_classes=len(classes)) if mixing else None  # fmt: skip
    loss_weights = weights.to(runtime.device) if params.balance is Balance.loss_weights else None
    criterion = SoftTargetCrossEntropy() if mixing else nn.CrossEntropyLoss(loss_weights, label_smoothing=params.label_smoothing)
    scaler = torch.amp.GradScaler(enabled=cuda and params.precision is Precision.fp16)
    network = DistributedDataParallel(model) if runtime.world_size > 1 else model

    state_path = state_dir / f"fold{fold}.state.pt"
    start, history = 0, []
    if state_path.exists():
        state = torch.load(state_path, map_location=runtime.device, weights_only=True)
        if state["fingerprint"] == fingerprint:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            start, history = state["epoch"], state["history"]
            if runtime.main and start < params.epochs:
                print(f"fold {fold}: resuming after epoch {start}")

    seconds, seen = 0.0, 0
    for epoch in range(start, params.epochs):
        sampler.set_epoch(epoch)
        augment.set_random_seed(seed * 1_000 + fold * 100 + epoch)
        np.random.seed(seed * 1_000 + fold * 100 + epoch)  # timm's Mixup draws from numpy's global RNG
        torch.manual_seed(seed * 1_000 + fold * 100 + epoch)
        network.train()
        losses, tick = [], time.perf_counter()
        bar = tqdm(loader, desc=f"fold {fold} epoch {epoch + 1}/{params.epochs}", unit="batch", disable=not runtime.main)
        for step, (images, labels) in enumerate(bar):
            images = images.to(runtime.device, non_blocking=True)
            if cuda and params.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            labels = labels.to(runtime.device, non_blocking=True)
            if mixup is not None:
                images, labels = mixup(images, labels)
            with _autocast(runtime, params.precision):
                loss = criterion(network(images).float(), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step_update(epoch * steps_per_epoch + step + 1)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses):.3f}")
        seconds += time.perf_counter() - tick
        seen += len(losses) * per_process_batch * runtime.world_size
        probabilities = predict_probabilities(model, val_loader, runtime.device)
        predicted = [classes[i] for i in probabilities.argmax(1)]
        scores = classification_metrics(list(val["fine_class"]), predicted)
        truth = torch.tensor([index[c] for c in val["fine_class"]])
        val_loss = nn.functional.nll_loss(torch.log(torch.from_numpy(probabilities) + 1e-8), truth).item()
        history.append({
            "epoch": epoch + 1, "train_loss": float(np.mean(losses)), "val_loss": val_loss,
            "val_macro_f1": scores["macro_f1"], "val_balanced_accuracy": scores["balanced_accuracy"],
            "lr": optimizer.param_groups[0]["lr"],
        })  # fmt: skip
        if runtime.main:
            _save_state(state_path, {"fingerprint": fingerprint, "epoch": epoch + 1, "history": history,
                                     "model": model.state_dict(), "optimizer": optimizer.state_dict()})  # fmt: skip
        runtime.barrier()
    return model, card, history, (seen / seconds if seconds else None)


def _curve_file(plots: Path, fold: int) -> Path:
    return plots / "curves" / f"fold{fold}.csv"


def train_classifier(
    model_params: ModelParams,
    params: ClassifyParams,
    seed: int,
    cells_dir: Path,
    test_dir: Path,
    out: Path,
    metrics: Path,
    plots: Path,
    state_dir: Path,
) -> None:
    """Train the fold models on the source cells of ``cells_dir/cells.csv``; write models, metrics and plots.

    The ensemble is scored on the role=test cells of ``test_dir/cells.csv`` (the untranslated
    prepared cells when ``cells_dir`` holds translated ones). ``state_dir`` keeps per-epoch
    training states so that an interrupted run resumes.
    """
    runtime = _runtime(params.device)
    cells = pd.read_csv(cells_dir / "cells.csv", keep_default_na=False)
    labelled = cells[cells["fine_class"] != ""]
    source = labelled[labelled["role"] == "source"]
    if source.empty:
        raise HemaflowError(f"{cells_dir / 'cells.csv'}: no labelled source cells to train on")
    classes = sorted(set(source["fine_class"]))
    data_hash = hashlib.sha256((cells_dir / "cells.csv").read_bytes()).hexdigest()
    out.mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("fold*"):  # models of folds no longer asked for must not join the ensemble
        if int(stale.name[4:].split(".")[0]) >= params.folds:
            stale.unlink()

    oof_rows, fold_scores, speeds = [], {}, []
    for fold in range(params.folds):
        train, val = source[source["fold"] != fold], source[source["fold"] == fold]
        if val.empty:
            raise HemaflowError(f"classify: fold {fold} has no labelled source cells; lower classify.folds")
        fingerprint = _fingerprint(model_params.model_dump(), params.model_dump(exclude={"num_workers", "device"}),
                                   seed, fold, data_hash)  # fmt: skip
        model, card, history, speed = _fit_fold(fold, train, val, classes, model_params, params, seed, cells_dir,
                                                state_dir, fingerprint, runtime)  # fmt: skip
        if speed is not None:
            speeds.append(speed)
        if not runtime.main:
            continue
        plain = build_transform(card.img_size, card.mean, card.std, None)
        val_set = CellDataset([cells_dir / p for p in val["crop"]], [0] * len(val), plain)
        probabilities = predict_probabilities(model, DataLoader(val_set, 64), runtime.device, params.tta)
        predicted = [classes[i] for i in probabilities.argmax(1)]
        fold_scores[str(fold)] = classification_metrics(list(val["fine_class"]), predicted)
        oof_rows.append(val.assign(predicted=predicted, confidence=probabilities.max(1)))
        card = replace(card, extra={"fold": fold, "val": fold_scores[str(fold)], "history": history,
                                    "model_params": model_params.model_dump(), "classify_params": params.model_dump(mode="json")})  # fmt: skip
        save_classifier(model.cpu(), card, out / f"fold{fold}")
        model.to(runtime.device)
        write_csv(_curve_file(plots, fold), pd.DataFrame(history))
    if runtime.main:
        _report(classes, pd.concat(oof_rows), fold_scores, speeds, model_params, params, test_dir, out, metrics, plots, runtime)
        for state in state_dir.glob("fold*.state.pt"):
            state.unlink()
    runtime.barrier()


def _report(
    classes: list[str],
    oof: pd.DataFrame,
    fold_scores: dict,
    speeds: list[float],
    model_params: ModelParams,
    params: ClassifyParams,
    test_dir: Path,
    out: Path,
    metrics: Path,
    plots: Path,
    runtime: _Runtime,
) -> None:
    """OOF and held-out test metrics of the fold ensemble; confusion data for DVC."""
    coarse_of = load_class_matrix().coarse_of
    oof_scores = classification_metrics(list(oof["fine_class"]), list(oof["predicted"]))
    result = {
        "backbone": model_params.backbone,
        "resolved_backbone": resolve_backbone(model_params.backbone),
        "classes": len(classes),
        "oof": _summary(oof_scores),
        "folds": {k: _summary(v) for k, v in fold_scores.items()},
        "train_images_per_second": float(np.mean(speeds)) if speeds else None,  # None: all resumed
    }
    cells = pd.read_csv(test_dir / "cells.csv", keep_default_na=False)
    test = cells[(cells["role"] == "test") & (cells["fine_class"] != "")]
    if not test.empty:
        ensemble = load_ensemble(out)
        probabilities = predict_crops(ensemble, [test_dir / p for p in test["crop"]], params.tta, runtime.device)
        predicted = [classes[i] for i in probabilities.argmax(1)]
        fine = classification_metrics(list(test["fine_class"]), predicted)
        coarse = classification_metrics([coarse_of[c] for c in test["fine_class"]], [coarse_of[c] for c in predicted])
        result["test"] = _summary(fine) | {"coarse_macro_f1": coarse["macro_f1"], "cells": len(test)}
    write_json(metrics, result)
    confusion = oof[["fine_class", "predicted"]].rename(columns={"fine_class": "actual"})
    write_csv(plots / "confusion.csv", confusion.sort_values(["actual", "predicted"], kind="stable"))
    write_csv(out / "oof.csv", oof.drop(columns=["x1", "y1", "x2", "y2"]))


def _summary(scores: dict) -> dict:
    return {
        "macro_f1": scores["macro_f1"],
        "balanced_accuracy": scores["balanced_accuracy"],
        "accuracy": scores["accuracy"],
        "per_class_f1": {label: v["f1"] for label, v in scores["per_class"].items()},
    }
