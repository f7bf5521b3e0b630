"""The ``translate`` stage and ``hemaflow translate``: source cells in the target's stain, labels kept.

For each adaptation method the stage writes ``<out>/crops/<cell_id>.png`` and ``<out>/cells.csv``
(the labelled source rows of prepare's table, ``crop`` pointing at the translated image, and where
the crop was cut: ``classify/crops.py``) for the classifier to train on, plus how well the method
did: SSIM between each cell and its translation (structure kept), KID to the target before and
after (look changed), a sample grid. (The UMAP of all methods is drawn once, by the ``compare`` stage.)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from itertools import islice
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from hemaflow._io import atomic_dir, write_csv, write_image, write_json
from hemaflow.classify.crops import DetectedCrops, match_detections, read_crop, training_crops
from hemaflow.data.images import ImageRejected, expand_images, load_rgb
from hemaflow.data.scale import crop_cell
from hemaflow.errors import HemaflowError
from hemaflow.params import AdaptationMethod, CropParams
from hemaflow.translate.cyclegan import ResnetGenerator
from hemaflow.translate.domain import FeatureNet, kernel_distance, mean_ssim
from hemaflow.translate.images import from_uint8, sample_grid, to_uint8
from hemaflow.translate.normalizers import fit_normalizer
from hemaflow.translate.train import domain_cells

__all__ = ["load_translator", "translate_cells", "translate_images"]

Translator = Callable[[list[np.ndarray]], list[np.ndarray | None]]  # None: this image could not be translated


def load_translator(model_dir: Path, direction: str = "to_target", device: str = "auto", batch: int = 32) -> Translator:
    """A trained CycleGAN generator as a function on uint8 images of any (equal) size."""
    card_path = model_dir / "translator.json"
    if not card_path.exists():
        raise HemaflowError(f"{model_dir}: no translator.json (run `dvc repro train_translator`)")
    card = json.loads(card_path.read_text())
    generator = ResnetGenerator(card["ngf"], card["n_blocks"], card["upsample"])
    generator.load_state_dict(load_file(model_dir / f"{direction}.safetensors"))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    target = torch.device("cuda" if use_cuda else "cpu")
    generator.to(target).eval()
    side = card["img_size"]

    @torch.no_grad()
    def translate(images: list[np.ndarray]) -> list[np.ndarray | None]:
        out: list[np.ndarray | None] = []
        for i in range(0, len(images), batch):
            chunk = images[i : i + batch]
            height, width = chunk[0].shape[:2]
            resized = [cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA) for image in chunk]
            with torch.autocast(target.type, dtype=torch.bfloat16, enabled=use_cuda):
                fake = generator(from_uint8(resized).to(target))
            out += [cv2.resize(image, (width, height), interpolation=cv2.INTER_CUBIC) for image in to_uint8(fake)]
        return out

    return translate


def _translator(method: AdaptationMethod, target_images: Sequence[np.ndarray], translator_dir: Path | None) -> Translator:
    if method is AdaptationMethod.none:
        return lambda images: list(images)
    if method is AdaptationMethod.cyclegan:
        if translator_dir is None:
            raise HemaflowError("translate: method cyclegan needs --translator (the train_translator output)")
        return load_translator(translator_dir)
    normalise = fit_normalizer(method, target_images)
    return lambda images: [normalise(image) for image in images]


def _crop_origins(cells: pd.DataFrame) -> dict:
    if "crop_from" not in cells:  # prepare's crops, unmatched: nothing to report
        return {}
    giou = cells["match_giou"].dropna()
    return {"crops_from": {origin: int(n) for origin, n in cells["crop_from"].value_counts().items()},
            "mean_match_giou": float(giou.mean()) if len(giou) else None}  # fmt: skip


def translate_cells(
    method: AdaptationMethod,
    reference_cells: int,
    seed: int,
    prepared: Path,
    translator_dir: Path | None,
    out: Path,
    metrics: Path,
    plots: Path,
    detected: DetectedCrops | None = None,
) -> None:
    """Write every labelled source cell translated by ``method``, with metrics and plots.

    With ``detected``, smear cells are cut around their matched detections first; else prepare's
    crops are translated.
    """
    source, target = domain_cells(prepared)
    if detected is not None:
        source = match_detections(source, detected.detections, detected.min_giou)
    rng = np.random.default_rng(seed)
    target_images = [read_crop(prepared / p) for p in target["crop"]]
    reference = [target_images[i] for i in sorted(rng.permutation(len(target_images))[:reference_cells])]
    translate = _translator(method, reference, translator_dir)
    originals, translated, failed = [], [], 0
    with atomic_dir(out) as staging:
        (staging / "crops").mkdir()
        crops = training_crops(source, prepared, detected)
        for i in tqdm(range(0, len(source), 64), desc=f"translate ({method.value})", unit="batch"):
            batch = list(islice(crops, 64))
            for cell_id, image, result in zip(source["cell_id"].iloc[i : i + 64], batch, translate(batch), strict=True):
                if result is None:  # the method could not handle this cell: keep it as it was
                    failed += 1
                    result = image
                write_image(staging / "crops" / f"{cell_id}.png", result)
                originals.append(image)
                translated.append(result)
        write_csv(staging / "cells.csv", source.assign(crop=[f"crops/{c}.png" for c in source["cell_id"]], adaptation=method.value))

    net = FeatureNet()
    result = {
        "method": method.value,
        "cells": len(translated),
        "untranslated_cells": failed,
        **_crop_origins(source),
        "ssim_luminance": mean_ssim(originals, translated),
        "kid_random_resnet18": {
            "source_to_target": kernel_distance(net, target_images, originals, seed),
            "translated_to_target": kernel_distance(net, target_images, translated, seed),
        },
    }
    write_json(metrics, result)
    step = max(len(originals) // 10, 1)
    sample_grid([originals[::step][:10], translated[::step][:10], target_images[:10]],
                ["source", method.value, "target (real)"], plots / "samples.png")  # fmt: skip


def translate_images(
    inputs: Sequence[Path], model_dir: Path, direction: str, crop: CropParams, px_per_um: float | None, out: Path,
    max_pixels: int,
) -> list[str]:  # fmt: skip
    """Translate single-cell images into ``out`` (PNG, same stem); return the errors (one per skipped file)."""
    translate = load_translator(model_dir, direction)
    errors = []
    for path in tqdm(expand_images(inputs), desc="translate", unit="image"):
        try:
            rgb, _, _ = load_rgb(path, max_pixels)
        except ImageRejected as exc:
            errors.append(f"{path}: {exc.reason}: {exc}")
            continue
        if px_per_um is not None:  # to the translator's training field of view first
            rgb, _ = crop_cell(rgb, None, px_per_um, crop.fov_um, crop.pixels, 0)
        write_image(out / f"{path.stem}.png", translate([rgb])[0])
    return errors
