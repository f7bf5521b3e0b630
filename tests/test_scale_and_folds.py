from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from hemaflow.data.folds import assign_folds
from hemaflow.data.scale import clip_box, crop_cell


def test_clip_box_within_tolerance_and_reject_beyond():
    assert clip_box((-3, 5, 50, 102), 100, 100, tolerance_px=4) == ((0.0, 5, 50, 100.0), True)
    assert clip_box((1, 1, 9, 9), 10, 10, tolerance_px=0) == ((1, 1, 9, 9), False)
    with pytest.raises(ValueError, match="outside"):
        clip_box((-30, 5, 50, 60), 100, 100, tolerance_px=4)


def _disc_image(px_per_um: float, size_px: int, diameter_um: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size_px, 0:size_px]
    centre = size_px / 2
    inside = np.hypot(xx + 0.5 - centre, yy + 0.5 - centre) < diameter_um * px_per_um / 2
    image = np.full((size_px, size_px, 3), 230, np.uint8)
    image[inside] = (60, 30, 90)
    return image


@pytest.mark.parametrize("px_per_um,size_px", [(10.0, 363), (13.8, 400), (11.52, 288)])
def test_a_cell_has_the_same_size_in_pixels_whichever_scanner(px_per_um, size_px):
    crop, grown = crop_cell(
        _disc_image(px_per_um, size_px, 12.0), None, px_per_um, fov_um=25.0, pixels=100, margin_px=0
    )
    diameter_px = (crop[50, :, 0] < 145).sum()
    assert not grown and abs(diameter_px - 12.0 / 25.0 * 100) <= 1.5


def test_crop_grows_rather_than_cutting_a_large_cell():
    image = _disc_image(10.0, 400, 30.0)
    crop, grown = crop_cell(image, (50, 50, 350, 350), 10.0, fov_um=25.0, pixels=64, margin_px=2)
    assert grown and crop.shape == (64, 64, 3)
    assert (crop[0, :, 0] > 145).all() and (crop[:, 0, 0] > 145).all()  # the border is background


def test_folds_keep_multi_cell_images_whole_and_balance_every_stratum():
    rng = np.random.default_rng(0)
    classes = ["neutrophil", "lymphocyte", "monocyte", "eosinophil"]
    strata = [{f"{c}@{d}" for c in rng.choice(classes, rng.integers(1, 3))} for d in ("a", "b") for _ in range(200)]
    folds = assign_folds(strata, n_folds=5, seed=1)
    assert folds.shape == (400,) and set(folds) == set(range(5))
    for stratum in set().union(*strata):
        per_fold = Counter(int(f) for f, s in zip(folds, strata, strict=True) if stratum in s)
        assert max(per_fold.values()) - min(per_fold.values()) <= 3
    assert (assign_folds(strata, 5, seed=1) == folds).all()
    assert (assign_folds(strata, 5, seed=2) != folds).any()


def test_a_single_stratum_still_gets_balanced_folds():
    folds = assign_folds([{"unlabelled@bccd"}] * 12, n_folds=3, seed=0)
    assert sorted(Counter(folds.tolist()).values()) == [4, 4, 4]
