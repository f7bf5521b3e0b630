"""The ``translate`` stage and ``hemaflow translate-images``: source cells in the target's stain, labels kept.

For one translation the stage writes ``<out>/crops/<cell_id>.png`` and ``<out>/cells.csv`` (the
``crop`` stage's table, ``crop`` pointing at the translated image) for the classifier to train
on, plus how well the translation did: SSIM between each cell and its translation (structure
kept), KID to the target before and after (look changed), a sample grid. Reinhard and Macenko
are fitted here on target cells; CycleGAN (stage ``translate_cyclegan``) loads the generator
that ``train_translator`` trained. The map of all translations is drawn once, by ``compare``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from hemaflow._io import atomic_dir, write_image, write_json, write_note_image
from hemaflow.data.images import ImageRejected, expand_images, load_rgb
from hemaflow.data.scale import crop_cell
from hemaflow.errors import HemaflowError
from hemaflow.params import CropParams, Translation
from hemaflow.runtime import select_device
from hemaflow.tables import read_cells, read_crops, source_and_target, write_cells
from hemaflow.translate.cyclegan import ResnetGenerator
from hemaflow.translate.domain import FeatureNet, kernel_distance, mean_ssim
from hemaflow.translate.images import from_uint8, sample_grid, to_uint8
from hemaflow.translate.normalizers import fit_normalizer

__all__ = ["NoTranslator", "load_translator", "translate", "translate_images"]


class NoTranslator(HemaflowError):
    """The pipeline trained no CycleGAN (translate.cyclegan.train is false)."""


Translator = Callable[[list[np.ndarray]], list[np.ndarray | None]]  # None: this image could not be translated
BATCH = 64


def load_translator(model_dir: Path, direction: str = "to_target", device: str = "auto") -> Translator:
    """A trained CycleGAN generator as a function on uint8 images of any (equal) size."""
    card_path = model_dir / "translator.json"
    if not card_path.exists():
        raise HemaflowError(f"{model_dir}: no translator.json (run `dvc repro train_translator`)")
    card = json.loads(card_path.read_text())
    if card.get("status") == "none":
        raise NoTranslator(f"{model_dir}: no translator was trained ({card['reason']})")
    generator = ResnetGenerator(card["ngf"], card["n_blocks"], card["upsample"])
    generator.load_state_dict(load_file(model_dir / f"{direction}.safetensors"))
    target = select_device(device, "translate.cyclegan.device")
    generator.to(target).eval()
    side = card["img_size"]

    @torch.no_grad()
    def translate_batch(images: list[np.ndarray]) -> list[np.ndarray | None]:
        height, width = images[0].shape[:2]
        resized = [cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA) for image in images]
        with torch.autocast(target.type, dtype=torch.bfloat16, enabled=target.type == "cuda"):
            fake = generator(from_uint8(resized).to(target))
        return [cv2.resize(image, (width, height), interpolation=cv2.INTER_CUBIC) for image in to_uint8(fake)]

    return translate_batch


def _translator(method: Translation, reference: Sequence[np.ndarray], translator_dir: Path | None) -> Translator:
    if method is Translation.none:
        return lambda images: list(images)
    if method is Translation.cyclegan:
        if translator_dir is None:
            raise HemaflowError("translate: method cyclegan needs --translator (the train_translator output)")
        return load_translator(translator_dir)
    normalise = fit_normalizer(method, reference)
    return lambda images: [normalise(image) for image in images]


def translate(
    *,
    method: Translation,
    reference_cells: int,
    seed: int,
    crops: Path,
    prepared: Path,
    translator: Path | None,
    out: Path,
    metrics: Path,
    plots: Path,
) -> None:
    """Write every training cell of ``crops`` translated by ``method`` (target cells from ``prepared``), with metrics and plots."""
    source = read_cells(crops, "crop")
    if method is Translation.cyclegan and translator is not None:
        try:
            load_translator(translator)
        except NoTranslator as reason:  # no method uses it: an empty translation that says why
            with atomic_dir(out) as staging:
                write_cells(staging, source.iloc[:0].assign(translation=method.value))
            write_json(metrics, {"translation": method.value, "status": "none", "reason": str(reason)})
            write_note_image(plots / "samples.png", f"no CycleGAN translation: {reason}")
            return
    _, target = source_and_target(prepared)
    rng = np.random.default_rng(seed)
    target_images = read_crops(prepared, target)
    reference = [target_images[i] for i in sorted(rng.permutation(len(target_images))[:reference_cells])]
    apply = _translator(method, reference, translator)
    originals, translated, failed = [], [], 0
    with atomic_dir(out) as staging:
        for start in tqdm(range(0, len(source), BATCH), desc=f"translate ({method.value})", unit="batch"):
            rows = source.iloc[start : start + BATCH]
            batch = read_crops(crops, rows)
            for cell_id, image, result in zip(rows["cell_id"], batch, apply(batch), strict=True):
                if result is None:  # the method could not handle this cell: keep it as it was
                    failed += 1
                    result = image
                write_image(staging / "crops" / f"{cell_id}.png", result)
                originals.append(image)
                translated.append(result)
        write_cells(
            staging, source.assign(crop=[f"crops/{c}.png" for c in source["cell_id"]], translation=method.value)
        )
    net = FeatureNet()
    write_json(
        metrics,
        {
            "translation": method.value,
            "cells": len(translated),
            "untranslated_cells": failed,
            "ssim_luminance": mean_ssim(originals, translated),
            "kid_random_resnet18": {
                "source_to_target": kernel_distance(net, target_images, originals, seed),
                "translated_to_target": kernel_distance(net, target_images, translated, seed),
            },
        },
    )
    step = max(len(originals) // 10, 1)
    sample_grid(
        [originals[::step][:10], translated[::step][:10], target_images[:10]],
        ["source", method.value, "target (real)"],
        plots / "samples.png",
    )


def translate_images(
    inputs: Sequence[Path],
    model_dir: Path,
    direction: str,
    geometry: CropParams,
    px_per_um: float | None,
    out: Path,
    max_pixels: int,
) -> list[str]:
    """Translate single-cell images into ``out`` (PNG, same stem); return the errors (one per skipped file)."""
    apply = load_translator(model_dir, direction)
    errors = []
    for path in tqdm(expand_images(inputs), desc="translate", unit="image"):
        try:
            rgb, _, _ = load_rgb(path, max_pixels)
        except ImageRejected as exc:
            errors.append(f"{path}: {exc.reason}: {exc}")
            continue
        if px_per_um is not None:  # to the translator's training field of view first
            rgb, _ = crop_cell(rgb, None, px_per_um, geometry.fov_um, geometry.pixels, 0)
        write_image(out / f"{path.stem}.png", apply([rgb])[0])
    return errors
