"""Inference: test-time augmentation, fold ensembles, weighted probability averaging."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from hemaflow.classify.data import CellDataset, build_transform
from hemaflow.classify.model import ModelCard, load_classifier
from hemaflow.errors import HemaflowError

__all__ = ["average_probabilities", "load_ensemble", "predict_crops", "predict_probabilities"]

FLIPS = {"hflip": [3], "vflip": [2]}  # tensor dims flipped (N, C, H, W)


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
def predict_probabilities(
    model: nn.Module, loader: DataLoader, device: torch.device, tta: Sequence[str] = (), progress: bool = False
) -> np.ndarray:
    """Softmax probabilities, averaged over the identity and each flip in ``tta``."""
    model.eval()
    views = [[], *(FLIPS[name] for name in tta)]
    outputs = []
    for images, _ in tqdm(loader, desc="classify", unit="batch", disable=not progress):
        images = images.to(device)
        probabilities = sum(model(images.flip(dims) if dims else images).float().softmax(1) for dims in views)
        outputs.append((probabilities / len(views)).cpu().numpy())
    return np.concatenate(outputs) if outputs else np.zeros((0, 0))


def load_ensemble(model_dir: Path) -> list[tuple[nn.Module, ModelCard]]:
    """Every fold model in ``model_dir`` (fold*.json + .safetensors); they must share classes."""
    stems = sorted(p.with_suffix("") for p in model_dir.glob("fold*.json"))
    if not stems:
        raise HemaflowError(f"{model_dir}: no fold models (run `dvc repro train_classifier`)")
    ensemble = [load_classifier(stem) for stem in stems]
    if len({tuple(card.classes) for _, card in ensemble}) != 1:
        raise HemaflowError(f"{model_dir}: fold models disagree on the class list; retrain")
    return ensemble


def predict_crops(
    ensemble: list[tuple[nn.Module, ModelCard]],
    crops: Sequence[Path | np.ndarray],
    tta: Sequence[str],
    device: torch.device,
    batch_size: int = 64,
    progress: bool = False,
) -> np.ndarray:
    """Ensemble-averaged probabilities for crops (image files or RGB uint8 arrays), N x classes."""
    results = []
    for model, card in ensemble:
        dataset = CellDataset(crops, [-1] * len(crops), build_transform(card.img_size, card.mean, card.std, None))
        loader = DataLoader(dataset, batch_size=batch_size)
        results.append(predict_probabilities(model.to(device), loader, device, tta, progress))
    return average_probabilities(results)
