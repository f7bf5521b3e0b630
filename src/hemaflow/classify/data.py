"""Cell crops as tensors: albumentations built from params, class balance, epoch sampling."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from hemaflow.params import AugmentParams
from hemaflow.tables import read_crop

__all__ = [
    "FDA_REFERENCES",
    "CellDataset",
    "EpochSampler",
    "Indexed",
    "build_transform",
    "class_weights",
    "with_adapted_copies",
    "with_slice_share",
]

FDA_REFERENCES = "fda_metadata"  # the transform's metadata key: unlabelled target cells, RGB uint8


def build_transform(
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    augment: AugmentParams | None,
    toward_target: Sequence[str] = (),
) -> A.Compose:
    """Resize to the network input, optional augmentation, then the backbone's normalisation.

    ``toward_target`` adds an adaptation recipe's augmentations (``stain``, ``fda``); ``fda`` draws
    its amplitudes from the reference cells that ``CellDataset`` passes (``FDA_REFERENCES``).
    """
    steps: list[A.BasicTransform] = [A.Resize(img_size, img_size, interpolation=cv2.INTER_AREA)]
    if augment is not None and "fda" in toward_target:  # the target's look first; the jitter below then varies it
        fda = augment.fda
        steps.append(A.FDA(beta_limit=(0, fda.beta_limit), metadata_key=FDA_REFERENCES, p=fda.p))
    if augment is not None and "stain" in toward_target:
        stain = augment.stain
        steps += [
            A.HEStain(
                method="random_preset",
                intensity_scale_range=(1 - stain.hed_scale, 1 + stain.hed_scale),
                intensity_shift_range=(-stain.hed_shift, stain.hed_shift),
                p=stain.p,
            ),
            A.HueSaturationValue(stain.hue_shift, stain.saturation_shift, 20, p=stain.p),
            A.PlanckianJitter(p=stain.p),
            A.Affine(
                scale=(1 - stain.scale_range, 1 + stain.scale_range), border_mode=cv2.BORDER_REFLECT_101, p=stain.p
            ),
        ]
    if augment is not None:
        steps += [
            A.HorizontalFlip(p=augment.hflip),
            A.VerticalFlip(p=augment.vflip),
            A.RandomRotate90(p=augment.rot90),
            A.Affine(
                scale=(1 - augment.scale_range, 1 + augment.scale_range),
                rotate=(-180, 180),
                translate_percent=(-0.05, 0.05),
                border_mode=cv2.BORDER_REFLECT_101,
                p=augment.affine,
            ),
            A.RandomBrightnessContrast(0.15, 0.15, p=augment.brightness_contrast),
            A.RandomGamma((85, 115), p=augment.gamma),
            A.HueSaturationValue(10, 20, 10, p=augment.hue_saturation),
            A.GaussianBlur(blur_limit=(3, 5), p=augment.blur),
            A.CoarseDropout(
                num_holes_range=(1, 4),
                hole_height_range=(0.05, 0.15),
                hole_width_range=(0.05, 0.15),
                fill="random_uniform",
                p=augment.coarse_dropout,
            ),
        ]
    steps.append(A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0))
    return A.Compose(steps)


class CellDataset(Dataset):
    """Crops (paths, or RGB uint8 arrays already in memory) with integer labels (-1: unknown).

    Returns (C x H x W float tensor, label).
    """

    def __init__(
        self,
        crops: Sequence[Path | np.ndarray],
        labels: Sequence[int],
        transform: A.Compose,
        references: Sequence[np.ndarray] = (),
    ):
        self.crops, self.labels, self.transform = list(crops), list(labels), transform
        self.metadata = {FDA_REFERENCES: list(references)} if len(references) else {}

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        crop = self.crops[index]
        image = crop if isinstance(crop, np.ndarray) else read_crop(crop)
        array = self.transform(image=image, **self.metadata)["image"]
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))), self.labels[index]


class Indexed(Dataset):
    """A dataset whose items also carry their own index: a batch then says which rows it holds."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple:
        return (*self.dataset[index], index)


def class_weights(labels: Sequence[int], num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights with mean 1 over the classes present (absent classes get 0)."""
    counts = np.bincount(np.asarray(labels), minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, 1.0 / np.maximum(counts, 1), 0.0)
    return torch.tensor(weights / weights[counts > 0].mean(), dtype=torch.float32)


def with_slice_share(
    weights: torch.Tensor | None, labels: Sequence[int], from_slice: np.ndarray, share: float
) -> torch.Tensor:
    """Per-cell draw weights in which the labelled target slice's cells (``from_slice``), class-balanced
    among themselves, take ``share`` of the total and the other cells keep their relative ``weights``
    (None: uniform) for the rest."""
    rest = torch.ones(len(labels)) if weights is None else weights.clone().float()
    in_slice = torch.from_numpy(np.array(from_slice, dtype=bool))  # a copy: the caller's array may be read-only
    slice_labels = np.asarray(labels)[in_slice.numpy()]
    balanced = class_weights(slice_labels, int(slice_labels.max()) + 1)[slice_labels]
    rest[in_slice] = 0.0
    if rest.sum() == 0:  # nothing but the slice to draw from
        share = 1.0
    else:
        rest *= (1 - share) / rest.sum()
    rest[in_slice] = balanced * share / balanced.sum()
    return rest


def with_adapted_copies(weights: torch.Tensor, from_slice: np.ndarray, share: float) -> torch.Tensor:
    """Draw weights over the cells listed twice, first as they are, then augmented toward the target:
    each source cell's weight split ``1 - share`` / ``share`` between its two copies; the slice's cells
    (``from_slice``), already the target's, only as they are. The total is unchanged."""
    in_slice = torch.from_numpy(np.array(from_slice, dtype=bool))
    adapted = torch.where(in_slice, 0.0, weights * share)
    return torch.cat([weights - adapted, adapted])


class EpochSampler(Sampler[int]):
    """``size`` indices for one epoch: a shuffle of range(size), or drawn with replacement by sample
    weights (class balance), which may cover more items than the epoch draws (``with_adapted_copies``).

    The draw depends only on (seed, epoch), so every process of a distributed run draws the same
    permutation and takes its own slice ``rank::world_size``; a resumed run redraws exactly.
    """

    def __init__(self, size: int, seed: int, weights: torch.Tensor | None = None, rank: int = 0, world_size: int = 1):
        self.size, self.seed, self.weights, self.rank, self.world_size = size, seed, weights, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size // self.world_size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.weights is None:
            order = torch.randperm(self.size, generator=generator)
        else:
            order = torch.multinomial(self.weights, self.size, replacement=True, generator=generator)
        usable = len(self) * self.world_size
        return iter(order[:usable][self.rank :: self.world_size].tolist())
