"""Physical scale from the images themselves: red-cell diameters, for datasets that carry no px/um.

BCCD, LISC, the CellaVision blog images and many lab datasets do not say how many pixels make a
micrometre, and every crop and field in hemaflow is cut in micrometres. Red cells are the most
common and least variable object on a smear: a healthy adult's red cells on a dried, stained film
measure about 7.5 um across (Bain, *Blood Cells: A Practical Guide*, 5th ed.: mean 7.5 um, most
between 6.7 and 7.7 um on films). So the scale is the red cells' diameter in pixels over 7.5 um.

Per image (``red_cell_radii``), inside a dark frame border if there is one:

1. cells are the pixels whose Lab colour is far from the plasma's (the median of the brightest
   30 %); a three-class Otsu split of that distance separates plasma, red cells and the darker
   white cells, and the first threshold keeps both kinds of cell; holes (the red cells' central
   pallor) are filled;
2. white cells are removed whole: every connected blob that holds a nucleus pixel (darker and
   bluer than the rest, Otsu on that score);
3. each remaining blob's inscribed-disc radius is read off its distance transform (local maxima,
   one per disc, touching cells split); a disc counts only if it lies inside the image and most
   of a ring just outside it is plasma (a cell of its own, not a fragment of a clump);
4. its radius is then measured where the colour distance falls to half the cell's level along 24
   rays from its centre (the half-contrast edge, which blur moves neither in nor out; a threshold's
   edge moved 5-15 % inwards on blurred, pale cells).

Over all images the radii are pooled with weights proportional to their areas (specks of debris
and platelet fragments weigh nothing), and the weighted median and quartiles give the estimate and
its spread. Checked against the calibrated data (``tests/test_calibrate.py``, README).

Images are read until 400 whole red cells or 200 images, not a fixed few dozen: a small folder of
crowded single-cell crops holds one or two whole red cells per image. On the 100 CellaVision blog
images, 40-image draws gave 8.91 to 9.71 px/um by seed (41 to 58 red cells), all 100 images 9.54
(120 red cells). Cells cut 7 % too large were enough to move a classifier's target macro-F1 by
0.02 to 0.13 (README, real benchmark).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage as ndi

from hemaflow.data.images import MAX_FIELD_PIXELS, ImageRejected, load_rgb

__all__ = ["RED_CELL_DIAMETER_UM", "ScaleEstimate", "estimate_px_per_um", "red_cell_radii"]

RED_CELL_DIAMETER_UM = 7.5
METHOD = "red-cell diameter at the half-contrast edge (area-weighted median) / 7.5 um"


@dataclass(frozen=True)
class ScaleEstimate:
    px_per_um: float
    spread: tuple[float, float]  # the estimate from the weighted 25th and 75th percentile of the radii
    red_cells: int
    images: int
    method: str = METHOD


def _two_thresholds(values: np.ndarray) -> tuple[int, int]:
    """Three-class Otsu on uint8 values: the two thresholds maximising the between-class variance."""
    p = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    p /= p.sum()
    levels = np.arange(256)
    weight, moment = np.cumsum(p), np.cumsum(p * levels)
    total = moment[-1]
    best, chosen = -1.0, (0, 0)
    for low in range(1, 254):
        high = np.arange(low + 1, 255)
        w0, w1, w2 = weight[low], weight[high] - weight[low], 1 - weight[high]
        m0 = moment[low] / max(w0, 1e-12)
        m1 = (moment[high] - moment[low]) / np.maximum(w1, 1e-12)
        m2 = (total - moment[high]) / np.maximum(w2, 1e-12)
        variance = w0 * (m0 - total) ** 2 + w1 * (m1 - total) ** 2 + w2 * (m2 - total) ** 2
        k = int(variance.argmax())
        if variance[k] > best:
            best, chosen = float(variance[k]), (low, int(high[k]))
    return chosen


def _inside_frame(rgb: np.ndarray) -> np.ndarray:
    """``rgb`` without a dark frame border (a microscope's field stop, a scanner's rim): the outer rows
    and columns, up to a quarter of each side, whose mean brightness is below 92 % of the image's
    typical row or column. The border would otherwise take the darkest Otsu class and the plasma ring
    test would reject every red cell near it."""
    grey = rgb.mean(-1)
    bounds = []
    for profile in (grey.mean(1), grey.mean(0)):  # rows, then columns
        dark = profile < 0.92 * np.median(profile)
        limit = len(profile) // 4
        first = next((i for i in range(limit) if not dark[i]), limit)
        last = next((i for i in range(limit) if not dark[len(profile) - 1 - i]), limit)
        bounds.append((first, len(profile) - last))
    (top, bottom), (left, right) = bounds
    return rgb[top:bottom, left:right]


def _cells(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB).astype(np.float64)
    lightness = lab[..., 0]
    plasma = np.median(lab[lightness >= np.percentile(lightness, 70)], axis=0)
    distance = np.clip(np.sqrt(((lab - plasma) ** 2).sum(-1)) * 2, 0, 255).astype(np.uint8)
    mask = distance > _two_thresholds(distance)[0]
    steps = max(1, min(rgb.shape[:2]) // 150)  # about 2 px on a 300 px image: noise, not cells
    mask = ndi.binary_closing(ndi.binary_opening(mask, iterations=steps), iterations=steps)
    return ndi.binary_fill_holes(mask), lab, plasma


def _without_white_cells(mask: np.ndarray, lab: np.ndarray, plasma: np.ndarray) -> np.ndarray:
    if not mask.any():
        return mask
    score = (plasma[0] - lab[..., 0]) + (plasma[2] - lab[..., 2])  # darker and bluer than plasma
    inside = score[mask]
    scaled = np.clip(inside - inside.min(), 0, 255).astype(np.uint8)
    threshold, _ = cv2.threshold(scaled.reshape(-1, 1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    nucleus = np.zeros_like(mask)
    nucleus[mask] = scaled > threshold
    labels, _ = ndi.label(mask)
    touched = np.unique(labels[nucleus])
    return mask & ~np.isin(labels, touched[touched > 0])


def _edge_radius(distance: np.ndarray, y: int, x: int, r: float) -> float | None:
    """The cell's radius at its half-contrast edge, the median over 24 rays (None: too few rays inside the image)."""
    height, width = distance.shape
    steps = np.linspace(0, 1.6, 81)
    radii = []
    for angle in np.linspace(0, 2 * np.pi, 24, endpoint=False):
        ys, xs = y + steps * r * np.sin(angle), x + steps * r * np.cos(angle)
        if ys.min() < 0 or xs.min() < 0 or ys.max() > height - 1 or xs.max() > width - 1:
            continue
        profile = ndi.map_coordinates(distance, [ys, xs], order=1)
        peak = int(np.argmax(np.where(steps > 0.4, profile, -np.inf)))  # the cell's rim, past the pale centre
        half = profile[peak] / 2
        outside = np.nonzero(profile[peak:] < half)[0]
        if len(outside) == 0:
            continue
        k = peak + int(outside[0])
        fraction = (profile[k - 1] - half) / (profile[k - 1] - profile[k])
        radii.append((steps[k - 1] + fraction * (steps[k] - steps[k - 1])) * r)
    return float(np.median(radii)) if len(radii) >= 8 else None


def red_cell_radii(rgb: np.ndarray) -> np.ndarray:
    """Radii (pixels) of the whole, separate red cells of one RGB image (see the module docstring)."""
    mask, lab, plasma = _cells(_inside_frame(rgb))
    mask = _without_white_cells(mask, lab, plasma)
    distance = np.sqrt(((lab - plasma) ** 2).sum(-1))
    depth = ndi.distance_transform_edt(mask)
    candidates = (depth == ndi.maximum_filter(depth, size=5)) & (depth >= 2)
    ys, xs = np.nonzero(candidates)
    height, width = mask.shape
    angles = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    kept: list[tuple[int, int, float]] = []
    for index in np.argsort(-depth[ys, xs], kind="stable"):
        y, x, r = int(ys[index]), int(xs[index]), float(depth[ys[index], xs[index]])
        reach = 1.3 * r
        if y < reach or x < reach or y > height - 1 - reach or x > width - 1 - reach:
            continue  # a cell cut by the image border would read too small
        if any((y - ky) ** 2 + (x - kx) ** 2 < 0.5 * (r + kr) ** 2 for ky, kx, kr in kept):
            continue  # another peak of a disc already counted
        ring_y = (y + reach * np.sin(angles)).astype(int)
        ring_x = (x + reach * np.cos(angles)).astype(int)
        if mask[ring_y, ring_x].mean() > 0.4:
            continue  # not a cell of its own: part of a clump or of a larger object
        kept.append((y, x, r))
    edges = (_edge_radius(distance, y, x, r) for y, x, r in kept)
    return np.array([e for e in edges if e is not None])


def _weighted_quantiles(radii: np.ndarray, quantiles: Sequence[float]) -> list[float]:
    order = np.argsort(radii)
    cumulative = np.cumsum(radii[order] ** 2) / (radii**2).sum()
    return [float(radii[order][min(np.searchsorted(cumulative, q), len(radii) - 1)]) for q in quantiles]


def estimate_px_per_um(paths: Sequence[Path], images: int = 200, seed: int = 0, red_cells: int = 400) -> ScaleEstimate:
    """The scale of a dataset from its images in a random order (drawn with ``seed``), read until
    ``red_cells`` whole red cells or ``images`` images; ValueError without red cells."""
    rng = np.random.default_rng(seed)
    radii, used, found = [], 0, 0
    for index in rng.permutation(len(paths))[:images]:
        try:
            rgb = load_rgb(Path(paths[index]), MAX_FIELD_PIXELS)[0]
        except ImageRejected:
            continue
        radii.append(red_cell_radii(rgb))
        used, found = used + 1, found + len(radii[-1])
        if found >= red_cells:  # smear fields hold dozens each: no need to read 200
            break
    pooled = np.concatenate(radii) if radii else np.zeros(0)
    if len(pooled) < 5:
        raise ValueError(f"found {len(pooled)} whole red cells in {used} images: too few to estimate the scale")
    low, median, high = (2 * r / RED_CELL_DIAMETER_UM for r in _weighted_quantiles(pooled, (0.25, 0.5, 0.75)))
    return ScaleEstimate(median, (low, high), len(pooled), used)
