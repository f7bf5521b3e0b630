"""Inference: test-time augmentation, fold ensembles, weighted averaging, crops cut at boxes.

The one path from cells to class probabilities: ``train_classifier`` (out-of-fold scores),
``evaluate`` and ``hemaflow predict`` / ``hemaflow classify`` all call ``predict_crops``, and
detected cells are cut by ``crops_at_boxes`` as the training crops were.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from hemaflow.classify.data import CellDataset, build_transform
from hemaflow.classify.model import ModelCard, load_classifier
from hemaflow.data.images import ImageRejected, expand_images, load_rgb
from hemaflow.data.scale import crop_cell
from hemaflow.errors import HemaflowError
from hemaflow.params import CropParams

__all__ = [
    "Ensemble",
    "average_probabilities",
    "classify_images",
    "crops_at_boxes",
    "ensemble_probabilities",
    "fold_logits",
    "load_ensemble",
    "predict_crops",
    "predict_logits",
    "seed_ensembles",
]

FLIPS = {"hflip": [3], "vflip": [2]}  # tensor dims flipped (N, C, H, W)
Ensemble = list[tuple[nn.Module, ModelCard]]


def average_probabilities(probabilities: Sequence[np.ndarray], weights: Sequence[float] | None = None) -> np.ndarray:
    """Weighted mean of several models' class probabilities (N x C each, same class order)."""
    if not probabilities:
        raise ValueError("nothing to average")
    shapes = {p.shape for p in probabilities}
    if len(shapes) != 1:
        raise ValueError(f"probability arrays differ in shape: {sorted(shapes)}")
    weights = np.ones(len(probabilities)) if weights is None else np.asarray(weights, dtype=np.float64)
    if len(weights) != len(probabilities) or (weights < 0).any() or weights.sum() == 0:
        raise ValueError(f"need one non-negative weight per model, not all zero; got {list(weights)}")
    return np.tensordot(weights / weights.sum(), np.stack(probabilities), axes=1)


@torch.no_grad()
def predict_logits(
    model: nn.Module, loader: DataLoader, device: torch.device, tta: Sequence[str] = (), progress: bool = False
) -> np.ndarray:
    """Logits averaged over the identity and each flip in ``tta`` (N x classes)."""
    model.eval()
    views = [[], *(FLIPS[name] for name in tta)]
    outputs = []
    for images, _ in tqdm(loader, desc="classify", unit="batch", disable=not progress):
        images = images.to(device)
        logits = sum(model(images.flip(dims) if dims else images).float() for dims in views) / len(views)
        outputs.append(logits.cpu().numpy())
    return np.concatenate(outputs) if outputs else np.zeros((0, 0))


def load_ensemble(model_dir: Path) -> Ensemble:
    """Every fold model in ``model_dir`` (fold*.json + .safetensors); they must share classes."""
    stems = sorted(p.with_suffix("") for p in Path(model_dir).glob("fold*.json"))
    if not stems:
        raise HemaflowError(f"{model_dir}: no fold models (run `dvc repro train_classifier`)")
    ensemble = [load_classifier(stem) for stem in stems]
    if len({tuple(card.classes) for _, card in ensemble}) != 1:
        raise HemaflowError(f"{model_dir}: fold models disagree on the class list; retrain")
    return ensemble


def seed_ensembles(model_dir: Path) -> dict[int, Ensemble]:
    """Every training seed's fold ensemble: the pipeline's (``model_dir``) first, then ``model_dir/seeds/seed<s>``."""
    first = load_ensemble(model_dir)
    ensembles = {int((first[0][1].extra or {}).get("seed", 0)): first}
    for folder in sorted((Path(model_dir) / "seeds").glob("seed*"), key=lambda f: int(f.name[4:])):
        ensembles[int(folder.name[4:])] = load_ensemble(folder)
    return ensembles


def fold_logits(
    ensemble: Ensemble,
    crops: Sequence[Path | np.ndarray],
    tta: Sequence[str],
    device: torch.device,
    batch_size: int = 64,
    progress: bool = False,
) -> list[np.ndarray]:
    """Each fold model's TTA-averaged logits for crops (image files or RGB uint8 arrays)."""
    results = []
    for model, card in ensemble:
        dataset = CellDataset(crops, [-1] * len(crops), build_transform(card.img_size, card.mean, card.std, None))
        results.append(
            predict_logits(model.to(device), DataLoader(dataset, batch_size=batch_size), device, tta, progress)
        )
    return results


def ensemble_probabilities(ensemble: Ensemble, logits: Sequence[np.ndarray], calibrated: bool = True) -> np.ndarray:
    """The fold models' softmax probabilities averaged; calibrated: each fold's logits divided by its temperature first."""
    return average_probabilities(
        [
            torch.from_numpy(z / (card.temperature if calibrated else 1.0)).softmax(1).numpy()
            for (_, card), z in zip(ensemble, logits, strict=True)
        ]
    )


def predict_crops(
    ensemble: Ensemble,
    crops: Sequence[Path | np.ndarray],
    tta: Sequence[str],
    device: torch.device,
    batch_size: int = 64,
    progress: bool = False,
) -> np.ndarray:
    """Calibrated class probabilities of the fold ensemble for crops (files or RGB uint8), N x classes."""
    if not len(crops):
        return np.zeros((0, len(ensemble[0][1].classes)))
    return ensemble_probabilities(ensemble, fold_logits(ensemble, crops, tta, device, batch_size, progress))


def crops_at_boxes(rgb: np.ndarray, boxes: np.ndarray, px_per_um: float, geometry: CropParams) -> list[np.ndarray]:
    """The crop of each box at the training field of view and pixel size, as the ``crop`` stage cuts them."""
    return [
        crop_cell(rgb, tuple(box), px_per_um, geometry.fov_um, geometry.pixels, geometry.margin_px)[0] for box in boxes
    ]


def classify_images(
    inputs: Sequence[Path],
    models: Path,
    geometry: CropParams,
    px_per_um: float | None,
    tta: Sequence[str],
    max_pixels: int,
    device: torch.device,
) -> pd.DataFrame:
    """A table with one row per image: class, confidence, per-class probabilities, or the error."""
    ensemble = load_ensemble(models)
    classes = ensemble[0][1].classes
    rows, usable = [], []
    for path in expand_images(inputs):
        try:
            rgb, _, _ = load_rgb(path, max_pixels)
        except ImageRejected as exc:
            rows.append({"image": str(path), "class": "", "confidence": None, "error": f"{exc.reason}: {exc}"})
            continue
        if px_per_um is not None:  # bring the cell to the training field of view first
            rgb, _ = crop_cell(rgb, None, px_per_um, geometry.fov_um, geometry.pixels, 0)
        side = ensemble[0][1].img_size  # what the models' transform resizes to anyway: keeps memory small
        usable.append((len(rows), cv2.resize(rgb, (side, side), interpolation=cv2.INTER_AREA)))
        rows.append({"image": str(path), "class": "", "confidence": None, "error": ""})
    if usable:
        probabilities = predict_crops(ensemble, [rgb for _, rgb in usable], tta, device, progress=True)
        for (row, _), p in zip(usable, probabilities, strict=True):
            rows[row] |= {"class": classes[int(p.argmax())], "confidence": float(p.max())}
            rows[row] |= {f"p_{name}": float(v) for name, v in zip(classes, p, strict=True)}
    return pd.DataFrame(rows)
