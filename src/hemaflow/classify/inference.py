"""``hemaflow classify``: single-cell images in, one class per image out."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import pandas as pd
import torch

from hemaflow.classify.predict import load_ensemble, predict_crops
from hemaflow.data.images import ImageRejected, expand_images, load_rgb
from hemaflow.data.scale import crop_cell
from hemaflow.params import CropParams

__all__ = ["classify_images"]


def classify_images(
    inputs: Sequence[Path], models: Path, crop: CropParams, px_per_um: float | None, tta: Sequence[str], max_pixels: int
) -> pd.DataFrame:
    """A table with one row per image: class, confidence, per-class probabilities, or the error."""
    ensemble = load_ensemble(models)
    classes = ensemble[0][1].classes
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows, usable = [], []
    for path in expand_images(inputs):
        try:
            rgb, _, _ = load_rgb(path, max_pixels)
        except ImageRejected as exc:
            rows.append({"image": str(path), "class": "", "confidence": None, "error": f"{exc.reason}: {exc}"})
            continue
        if px_per_um is not None:  # bring the cell to the training field of view first
            rgb, _ = crop_cell(rgb, None, px_per_um, crop.fov_um, crop.pixels, 0)
        side = ensemble[0][1].img_size  # what the models' transform resizes to anyway: keeps memory small
        usable.append((len(rows), cv2.resize(rgb, (side, side), interpolation=cv2.INTER_AREA)))
        rows.append({"image": str(path), "class": "", "confidence": None, "error": ""})
    if usable:
        probabilities = predict_crops(ensemble, [rgb for _, rgb in usable], tta, device, progress=True)
        for (row, _), p in zip(usable, probabilities, strict=True):
            rows[row] |= {"class": classes[int(p.argmax())], "confidence": float(p.max())}
            rows[row] |= {f"p_{name}": float(v) for name, v in zip(classes, p, strict=True)}
    return pd.DataFrame(rows)
