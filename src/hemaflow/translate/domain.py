"""How far apart two sets of cells look: features, kernel distance, SSIM, a map of the domains.

No Inception weights can be downloaded here, so the distance is KID computed on the pooled
features of a ResNet-18 with fixed random weights (seed 0), scaled to unit length. Random convolutional features
respond to colour and texture statistics, which is what stain translation changes; the number
is called ``kid_random_resnet18`` so that nobody compares it with published FID/KID values.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import timm
import torch
from matplotlib.figure import Figure
from torch import nn
from torchmetrics.functional.image import structural_similarity_index_measure
from torchmetrics.image.kid import KernelInceptionDistance

from hemaflow._io import write_csv, write_figure, write_note_image
from hemaflow.tables import read_cells, read_crops, source_and_target

__all__ = ["FeatureNet", "domain_map", "kernel_distance", "mean_ssim"]

FEATURE_SIZE = 64  # cells are compared at this side, whatever the crop size


class FeatureNet(nn.Module):
    """Pooled features of a fixed random ResNet-18 for uint8 images (what KID and the map of the domains see)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:  # N x 3 x H x W uint8
        x = nn.functional.interpolate(images.float() / 255, size=FEATURE_SIZE, mode="area")
        features = self.net((x - 0.5) / 0.25)
        # Unit-length features scaled by sqrt(d): KID's cubic kernel (x.y / d + 1)^3 then sees cosine
        # similarities, whatever the (arbitrary) scale of random-weight activations.
        return nn.functional.normalize(features, dim=1) * features.shape[1] ** 0.5

    def embed(self, images: Sequence[np.ndarray], batch: int = 128) -> np.ndarray:
        chunks = [self(_batch(images[i : i + batch])).numpy() for i in range(0, len(images), batch)]
        return np.concatenate(chunks)


def _batch(images: Sequence[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def kernel_distance(net: FeatureNet, real: Sequence[np.ndarray], fake: Sequence[np.ndarray], seed: int) -> dict:
    """KID (mean and std over random subsets) between two image sets on ``net``'s features."""
    torch.manual_seed(seed)
    subset = min(100, len(real), len(fake))
    with warnings.catch_warnings():  # "saves all features in a buffer": intended, the sets are small
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=net, subsets=50, subset_size=subset)
    for images, is_real in ((real, True), (fake, False)):
        for i in range(0, len(images), 128):
            kid.update(_batch(images[i : i + 128]), real=is_real)
    mean, std = kid.compute()
    return {"mean": float(mean), "std": float(std)}


def mean_ssim(before: Sequence[np.ndarray], after: Sequence[np.ndarray]) -> float:
    """Mean SSIM between each image and its translation, on luminance: structure kept, colour free to change."""

    def luminance(images: Sequence[np.ndarray]) -> torch.Tensor:
        x = _batch(images).float() / 255
        return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)

    scores = [
        structural_similarity_index_measure(
            luminance(after[i : i + 256]), luminance(before[i : i + 256]), data_range=1.0, reduction="none"
        )
        for i in range(0, len(before), 256)
    ]
    return float(torch.cat(scores).mean())


def domain_map(*, prepared: Path, translated: Path, translations: Sequence[str], csv: Path, png: Path) -> None:
    """One map of the cells of every domain, before and after each translation: the first two principal
    components of the cells' features.

    The components are fitted on all groups together (source as prepared, each translation of the
    source, target), so the panels share coordinates: a translation that works moves the source cloud
    onto the target cloud. A linear map is exact to reproduce and takes milliseconds (UMAP took 25 s
    of numba compilation per run and varied with the machine).
    """
    if read_cells(prepared)["role"].ne("target").all():
        write_csv(csv, pd.DataFrame(columns=["x", "y", "group"]))
        write_note_image(png, "no target domain in the data: no map of the domains to draw")
        return
    source, target = source_and_target(prepared)
    net = FeatureNet()
    features = {"source": net.embed(read_crops(prepared, source)), "target": net.embed(read_crops(prepared, target))}
    adapted = [m for m in translations if m != "none"]
    for method in adapted:
        features[method] = net.embed(read_crops(translated / method, read_cells(translated / method, "translate")))
    groups = list(features)
    stacked = np.concatenate([features[g] for g in groups])
    centred = stacked - stacked.mean(0)
    _, _, axes_t = np.linalg.svd(centred, full_matrices=False)
    xy = centred @ axes_t[:2].T * np.sign(axes_t[:2].sum(1))  # signs fixed: the same map on every machine
    frame = pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1], "group": np.repeat(groups, [len(features[g]) for g in groups])})
    write_csv(csv, frame.round(4))
    panels = [("source", "before translation")] + [(m, f"after {m}") for m in adapted]
    fig = Figure(figsize=(4.2 * len(panels), 4.4))
    axes = fig.subplots(1, len(panels), sharex=True, sharey=True, squeeze=False)
    for ax, (group, heading) in zip(axes[0], panels, strict=True):
        for shown, colour in ((group, "tab:blue"), ("target", "tab:green")):
            part = frame[frame["group"] == shown]
            ax.scatter(
                part["x"], part["y"], s=5, alpha=0.6, c=colour, label="target" if shown == "target" else "source"
            )
        ax.set_title(heading)
        ax.legend(markerscale=2, loc="best")
    fig.suptitle("Principal components of cell features (fixed random ResNet-18), source vs target domain")
    fig.tight_layout()
    write_figure(png, fig)
