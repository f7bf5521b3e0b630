"""Stratified k-fold at image level, multi-label so that images with several cells stay whole."""

from __future__ import annotations

import numpy as np
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold
from sklearn.model_selection import KFold

__all__ = ["assign_folds"]


def assign_folds(strata: list[set[str]], n_folds: int, seed: int) -> np.ndarray:
    """Fold index per image, stratified on its set of strata (e.g. ``{"monocyte@matek"}``).

    Iterative stratification (Sechidis et al. 2011, the CytologIA winner's choice) balances every
    stratum across folds even when images hold several cells of different classes. The result
    depends only on the strata, their order, ``n_folds`` and ``seed``.
    """
    if len(strata) < n_folds:
        raise ValueError(f"{len(strata)} images cannot fill {n_folds} folds: lower prepare.folds")
    names = sorted(set().union(*strata))
    folds = np.full(len(strata), -1, dtype=np.int64)
    if len(names) == 1:  # nothing to balance (iterstrat needs two strata): a shuffled k-fold
        for fold, (_, held_out) in enumerate(KFold(n_folds, shuffle=True, random_state=seed).split(strata)):
            folds[held_out] = fold
        return folds
    column = {name: i for i, name in enumerate(names)}
    matrix = np.zeros((len(strata), len(names)), dtype=np.int8)
    for row, labels in enumerate(strata):
        matrix[row, [column[label] for label in labels]] = 1
    splitter = MultilabelStratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for fold, (_, held_out) in enumerate(splitter.split(np.zeros(len(strata)), matrix)):
        folds[held_out] = fold
    return folds
