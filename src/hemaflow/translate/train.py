"""The ``train_translator`` stage: CycleGAN between labelled source cells and unlabelled target cells.

Domain A is the union of every labelled source domain, domain B the target domain's cells; both
come from prepare's crops, so the physical scale is already the same. The two sides are sampled
independently (unpaired). Recipe: LSGAN, cycle weight ``lambda_cycle``, identity weight
``lambda_identity x lambda_cycle``, discriminator loss halved, image pools, Adam with beta1 0.5,
learning rate constant for ``epochs`` then linearly to zero over ``epochs_decay``. An epoch is
``max(|A|, |B|)`` images. With ``lambda_class`` > 0 the translation must keep the class (CyCADA's
semantic consistency, Hoffman et al. 2018): an auxiliary classifier learns the fine classes from the
real source cells beside the discriminators, and the source-to-target generator is penalised by its
cross-entropy on the translated cells. Plain CycleGAN changed what real cells look like, not only
their stain (issue 15: the source lost 0.13 macro-F1). The training state is saved after every epoch (tensors and plain values,
loaded with ``weights_only=True``) and a rerun with the same params and data resumes from it.
"""

from __future__ import annotations

import collections
import itertools
import random
import time
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler
from tqdm import tqdm

from hemaflow._io import atomic_dir, write_csv, write_json, write_note_image, write_tensors
from hemaflow.errors import HemaflowError
from hemaflow.params import CycleGanParams
from hemaflow.resume import TrainingState, file_digest, fingerprint
from hemaflow.runtime import autocast, conditions, select_device
from hemaflow.tables import read_crop, source_and_target
from hemaflow.translate.cyclegan import ImagePool, PatchClassifier, PatchDiscriminator, ResnetGenerator, init_weights
from hemaflow.translate.images import sample_grid, to_uint8

__all__ = ["CycleGan", "train_step", "train_translator"]

LOSSES = ("G_A", "G_B", "cycle_A", "cycle_B", "idt_A", "idt_B", "D_A", "D_B", "class_A", "C")
UNLABELLED = -1


class _Crops(Dataset):
    """(image in [-1, 1], class index or ``UNLABELLED``)."""

    def __init__(self, paths: list[Path], labels: list[int], img_size: int):
        self.paths, self.labels = paths, labels
        self.transform = A.Compose(
            [
                A.Resize(img_size, img_size, interpolation=cv2.INTER_AREA),
                A.HorizontalFlip(),
                A.VerticalFlip(),
                A.RandomRotate90(),
                A.Normalize(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), max_pixel_value=255.0),
            ]
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        array = self.transform(image=read_crop(self.paths[index]))["image"]
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))), self.labels[index]


class CycleGan(nn.Module):
    """The four networks; ``G_A`` translates source to target, ``G_B`` target to source; with
    ``lambda_class`` > 0 a fifth, ``C``, the auxiliary classifier of the source's ``classes``."""

    def __init__(self, params: CycleGanParams, seed: int, classes: int):
        super().__init__()
        self.G_A = ResnetGenerator(params.ngf, params.n_blocks, params.upsample)
        self.G_B = ResnetGenerator(params.ngf, params.n_blocks, params.upsample)
        self.D_A = PatchDiscriminator(params.ndf)
        self.D_B = PatchDiscriminator(params.ndf)
        self.C = PatchClassifier(params.ndf, classes) if params.lambda_class > 0 else None
        generator = torch.Generator().manual_seed(seed)
        for network in (self.G_A, self.G_B, self.D_A, self.D_B, self.C):
            if network is not None:
                init_weights(network, generator)

    def judges(self) -> list[nn.Module]:
        """The networks the generators are trained against: discriminators and classifier."""
        return [n for n in (self.D_A, self.D_B, self.C) if n is not None]


def _lsgan(prediction: torch.Tensor, real: bool) -> torch.Tensor:
    return nn.functional.mse_loss(prediction.float(), torch.full_like(prediction.float(), float(real)))


def train_step(
    gan: CycleGan,
    real_a: torch.Tensor,
    labels_a: torch.Tensor,
    real_b: torch.Tensor,
    pools: tuple[ImagePool, ImagePool],
    params: CycleGanParams,
    optimizers: tuple,
    scaler: torch.amp.GradScaler,
    mixed_precision: torch.autocast,
) -> dict:
    """One generator update, then one update of the judges; the batch's losses."""
    optimizer_g, optimizer_d = optimizers
    for judge in gan.judges():
        judge.requires_grad_(False)
    with mixed_precision:
        fake_b, fake_a = gan.G_A(real_a), gan.G_B(real_b)
        rec_a, rec_b = gan.G_B(fake_b), gan.G_A(fake_a)
        losses = {
            "G_A": _lsgan(gan.D_A(fake_b), True),
            "G_B": _lsgan(gan.D_B(fake_a), True),
            "cycle_A": nn.functional.l1_loss(rec_a.float(), real_a) * params.lambda_cycle,
            "cycle_B": nn.functional.l1_loss(rec_b.float(), real_b) * params.lambda_cycle,
        }
        if params.lambda_identity > 0:
            weight = params.lambda_cycle * params.lambda_identity
            losses["idt_A"] = nn.functional.l1_loss(gan.G_A(real_b).float(), real_b) * weight
            losses["idt_B"] = nn.functional.l1_loss(gan.G_B(real_a).float(), real_a) * weight
        if gan.C is not None:
            losses["class_A"] = nn.functional.cross_entropy(gan.C(fake_b).float(), labels_a) * params.lambda_class
    optimizer_g.zero_grad(set_to_none=True)
    scaler.scale(sum(losses.values())).backward()
    scaler.step(optimizer_g)
    for judge in gan.judges():
        judge.requires_grad_(True)
    with mixed_precision:
        old_b, old_a = pools[0].query(fake_b), pools[1].query(fake_a)
        losses["D_A"] = 0.5 * (_lsgan(gan.D_A(real_b), True) + _lsgan(gan.D_A(old_b.detach()), False))
        losses["D_B"] = 0.5 * (_lsgan(gan.D_B(real_a), True) + _lsgan(gan.D_B(old_a.detach()), False))
        judged = losses["D_A"] + losses["D_B"]
        if gan.C is not None:  # learns the classes from real source cells only: translations cannot teach it a flip
            losses["C"] = nn.functional.cross_entropy(gan.C(real_a).float(), labels_a)
            judged = judged + losses["C"]
    optimizer_d.zero_grad(set_to_none=True)
    scaler.scale(judged).backward()
    scaler.step(optimizer_d)
    scaler.update()
    return {name: value.item() for name, value in losses.items()}


def _loader(
    paths: list[Path], labels: list[int], params: CycleGanParams, samples: int, seed: int, cuda: bool
) -> DataLoader:
    sampler = RandomSampler(
        range(len(paths)), replacement=True, num_samples=samples, generator=torch.Generator().manual_seed(seed)
    )
    return DataLoader(
        _Crops(paths, labels, params.img_size),
        params.batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=params.num_workers,
        pin_memory=cuda,
    )


def _export(gan: CycleGan, params: CycleGanParams, crop_pixels: int, history: list[dict], out: Path) -> None:
    """Both generators as safetensors plus the JSON that rebuilds them (``translate.load_translator``)."""
    with atomic_dir(out) as staging:
        for name, network in (("to_target", gan.G_A), ("to_source", gan.G_B)):
            write_tensors(staging / f"{name}.safetensors", network.state_dict())
        write_json(
            staging / "translator.json",
            {
                "ngf": params.ngf,
                "n_blocks": params.n_blocks,
                "upsample": params.upsample,
                "img_size": params.img_size,
                "crop_pixels": crop_pixels,
                "epochs": len(history),
                "final_losses": history[-1] if history else {},
            },
        )


def train_translator(
    *,
    params: CycleGanParams,
    seed: int,
    crop_pixels: int,
    prepared: Path,
    out: Path,
    metrics: Path,
    plots: Path,
    state: Path,
) -> None:
    """Train CycleGAN on prepared crops; write ``out`` (generators), ``metrics`` and ``plots``.

    With ``params.train`` false (no adaptation method translates with CycleGAN) nothing is trained:
    the card says so, and the metrics and plots record why.
    """
    if not params.train:
        reason = "translate.cyclegan.train is false: no adaptation method translates with CycleGAN"
        with atomic_dir(out) as staging:
            write_json(staging / "translator.json", {"status": "none", "reason": reason})
        write_json(metrics, {"status": "none", "reason": reason})
        write_csv(plots / "losses.csv", pd.DataFrame(columns=["epoch", "lr", *(f"loss_{n}" for n in LOSSES)]))
        write_note_image(plots / "samples.png", f"no translator trained: {reason}")
        return
    source, target = source_and_target(prepared)
    device = select_device(params.device, "translate.cyclegan.device")
    cuda = device.type == "cuda"
    classes = sorted(source["fine_class"].unique())
    torch.manual_seed(seed)
    gan = CycleGan(params, seed, len(classes)).to(device)
    optimizer_g = torch.optim.Adam(
        itertools.chain(gan.G_A.parameters(), gan.G_B.parameters()), params.lr, betas=(params.beta1, 0.999)
    )
    optimizer_d = torch.optim.Adam(
        itertools.chain(*(judge.parameters() for judge in gan.judges())), params.lr, betas=(params.beta1, 0.999)
    )
    total_epochs = params.epochs + params.epochs_decay

    def lr_factor(epoch: int) -> float:  # the reference's linear policy, epochs counted from 0
        return 1.0 - max(0, epoch + 1 - params.epochs) / (params.epochs_decay + 1)

    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lr_factor) for o in (optimizer_g, optimizer_d)]
    scaler = torch.amp.GradScaler(enabled=cuda and params.precision == "fp16")
    pools = (ImagePool(params.pool_size, random.Random()), ImagePool(params.pool_size, random.Random()))

    paths_a = [prepared / p for p in source["crop"]]
    paths_b = [prepared / p for p in target["crop"]]
    labels_a = [classes.index(c) for c in source["fine_class"]]
    labels_b = [UNLABELLED] * len(paths_b)
    samples = max(len(paths_a), len(paths_b))
    if samples < params.batch_size:
        raise HemaflowError(f"translate.cyclegan.batch_size={params.batch_size} exceeds the {samples} cells per epoch")
    key = fingerprint(
        params.model_dump(mode="json", exclude={"num_workers", "device"}),
        seed,
        crop_pixels,
        file_digest(prepared / "cells.csv"),
    )
    training_state = TrainingState(state / "cyclegan.state.pt", key)
    start, history = 0, []
    saved = training_state.load(device)
    if saved is not None:
        gan.load_state_dict(saved["model"])
        optimizer_g.load_state_dict(saved["optimizer_g"])
        optimizer_d.load_state_dict(saved["optimizer_d"])
        for pool, images in zip(pools, saved["pools"], strict=True):
            pool.load(images, device)
        start, history = saved["epoch"], saved["history"]
        print(f"translator: resuming after epoch {start} of {total_epochs}")
    for scheduler in schedulers:
        scheduler.last_epoch = start - 1
        scheduler.step()

    seconds, seen = 0.0, 0
    for epoch in range(start, total_epochs):
        epoch_seed = seed * 1_000 + epoch
        for pool, offset in zip(pools, (1, 2), strict=True):
            pool.rng.seed(epoch_seed + offset)
        torch.manual_seed(epoch_seed)
        loaders = [
            _loader(paths, labels, params, samples, epoch_seed + k, cuda)
            for k, paths, labels in ((3, paths_a, labels_a), (4, paths_b, labels_b))
        ]
        for loader in loaders:
            loader.dataset.transform.set_random_seed(epoch_seed)
        gan.train()
        sums, steps, tick = collections.Counter(), 0, time.perf_counter()
        bar = tqdm(
            zip(*loaders, strict=True),
            total=len(loaders[0]),
            desc=f"cyclegan epoch {epoch + 1}/{total_epochs}",
            unit="batch",
        )
        for (real_a, class_a), (real_b, _) in bar:
            losses = train_step(
                gan,
                real_a.to(device, non_blocking=True),
                class_a.to(device, non_blocking=True),
                real_b.to(device, non_blocking=True),
                pools,
                params,
                (optimizer_g, optimizer_d),
                scaler,
                autocast(device, params.precision),
            )
            for name, value in losses.items():
                sums[name] += value
            steps += 1
            bar.set_postfix(
                G=f"{(sums['G_A'] + sums['G_B']) / steps:.3f}", D=f"{(sums['D_A'] + sums['D_B']) / steps:.3f}"
            )
        seconds += time.perf_counter() - tick
        seen += steps * params.batch_size
        for scheduler in schedulers:
            scheduler.step()
        history.append(
            {"epoch": epoch + 1, "lr": optimizer_g.param_groups[0]["lr"]}
            # a loss this recipe leaves off (identity at lambda_identity 0, class at lambda_class 0) is
            # empty in plots/translate/losses.csv, not a 0 that reads as a perfectly kept class
            | {f"loss_{name}": sums[name] / steps if name in sums else None for name in LOSSES}
        )
        training_state.save(
            {
                "epoch": epoch + 1,
                "history": history,
                "model": gan.state_dict(),
                "optimizer_g": optimizer_g.state_dict(),
                "optimizer_d": optimizer_d.state_dict(),
                "pools": [p.state() for p in pools],
            }
        )

    gan.eval()
    write_csv(plots / "losses.csv", pd.DataFrame(history))
    _sample_grid(gan, paths_a[:: max(len(paths_a) // 8, 1)][:8], params, device, plots / "samples.png")
    final = history[-1]
    write_json(
        metrics,
        {
            "epochs": len(history),
            "source_cells": len(paths_a),
            "target_cells": len(paths_b),
            "final_losses": {k[5:]: v for k, v in final.items() if k.startswith("loss_") and v is not None},
            "train_ms_per_image": 1000 * seconds / seen if seen else None,  # None: everything resumed
            "device": device.type,
            "conditions": conditions(),
        },
    )
    _export(gan.cpu(), params, crop_pixels, history, out)
    training_state.clear()


@torch.no_grad()
def _sample_grid(gan: CycleGan, paths: list[Path], params: CycleGanParams, device: torch.device, out: Path) -> None:
    """Rows: source cell, translated to the target, reconstructed back."""
    plain = A.Compose(
        [
            A.Resize(params.img_size, params.img_size, interpolation=cv2.INTER_AREA),
            A.Normalize(mean=(0.5,) * 3, std=(0.5,) * 3, max_pixel_value=255.0),
        ]
    )
    batch = [plain(image=read_crop(path))["image"].transpose(2, 0, 1) for path in paths]
    real = torch.from_numpy(np.stack(batch)).to(device)
    fake = gan.G_A(real)
    rows = [to_uint8(t) for t in (real, fake, gan.G_B(fake))]
    sample_grid(rows, ["source", "translated", "reconstructed"], out)
