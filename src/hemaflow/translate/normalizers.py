"""Classic stain normalisers fitted on target-domain cells (torchstain).

Reinhard matches the mean and standard deviation of each LAB channel. Macenko estimates two stain
vectors (haematoxylin and eosin) in optical density and maps the source's concentrations onto
the target's; it assumes exactly two stains, so Romanowsky-type blood stains (May-Gruenwald-
Giemsa, Wright: azure, methylene blue and eosin) are only approximated, and cells with little
stained area (a small lymphocyte among pale red cells) give unstable vectors. Where its fit fails
on an image, the image is kept unchanged and counted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torchstain.torch.normalizers import TorchMacenkoNormalizer, TorchReinhardNormalizer

from hemaflow.params import Translation

__all__ = ["Normalizer", "fit_normalizer", "montage"]

Normalizer = Callable[[np.ndarray], np.ndarray | None]  # H x W x 3 uint8 -> same, or None when it fails


def montage(images: Sequence[np.ndarray]) -> np.ndarray:
    """Equal-sized images tiled into one near-square image (what the normalisers are fitted on)."""
    columns = int(np.ceil(np.sqrt(len(images))))
    rows = int(np.ceil(len(images) / columns))
    height, width = images[0].shape[:2]
    canvas = np.zeros((rows * height, columns * width, 3), np.uint8)
    for index, image in enumerate(images):
        r, c = divmod(index, columns)
        canvas[r * height : (r + 1) * height, c * width : (c + 1) * width] = image
    if rows * columns > len(images):  # fill the empty slots so they do not skew the statistics
        for index in range(len(images), rows * columns):
            r, c = divmod(index, columns)
            canvas[r * height : (r + 1) * height, c * width : (c + 1) * width] = images[index % len(images)]
    return canvas


def _chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def fit_normalizer(method: Translation, target_images: Sequence[np.ndarray]) -> Normalizer:
    """A function that brings one image to the look of ``target_images``."""
    reference = _chw(montage(target_images))
    if method is Translation.reinhard:
        reinhard = TorchReinhardNormalizer()
        reinhard.fit(reference)
        return lambda image: reinhard.normalize(_chw(image)).numpy()  # torchstain returns H x W x 3 here
    if method is Translation.macenko:
        macenko = TorchMacenkoNormalizer()
        macenko.fit(reference)

        def normalise(image: np.ndarray) -> np.ndarray | None:
            try:
                result, _, _ = macenko.normalize(_chw(image), stains=False)
            except (RuntimeError, IndexError):  # too few stained pixels for the two-stain fit
                return None
            result = result.clamp(0, 255).to(torch.uint8).numpy()
            return result if np.isfinite(result).all() else None

        return normalise
    raise ValueError(f"{method.value} is not a classic normaliser")
