"""The ``check_translations`` stage: does a translation keep each cell's class?

A translator that paints neutrophils into lymphocytes makes the classifier learn wrong labels,
and neither SSIM nor KID notices. The check: the classifier trained on the untranslated source
cells (``adapt.methods.none``) predicts every translated source cell, each by the fold model that
did not train on it (out of fold), and the share still given its true class is compared with the
share on the same cells untranslated. Per class, the most frequent wrong class shows where a
translation moves cells to.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from hemaflow._io import write_csv, write_json
from hemaflow.classify.inference import Ensemble, load_ensemble, predict_crops
from hemaflow.params import ClassifyParams
from hemaflow.runtime import select_device
from hemaflow.tables import labelled, read_cells

__all__ = ["check_translations", "class_kept"]

UNTRANSLATED = "untranslated"


def class_kept(truth: pd.Series, predicted: pd.Series) -> dict:
    """Share of cells predicted as their true class, overall and per class, and each class's most
    frequent wrong prediction with its share of that class."""
    per_class = {}
    for label, part in truth.groupby(truth, sort=True):
        chosen = predicted[part.index]
        wrong = chosen[chosen != label].value_counts()
        per_class[label] = {
            "kept": float((chosen == label).mean()),
            "cells": len(part),
            "mostly_became": wrong.index[0] if len(wrong) else None,
            "mostly_became_share": float(wrong.iloc[0] / len(part)) if len(wrong) else 0.0,
        }
    return {"kept": float((truth == predicted).mean()), "cells": len(truth), "per_class": per_class}


def _out_of_fold(ensemble: Ensemble, cells: pd.DataFrame, folder: Path, classify: ClassifyParams) -> pd.Series:
    """The class of each cell of a held-out fold, predicted by the fold model that held it out (cells
    of folds every model trained on, when ``classify.folds`` < ``prepare.folds``, are left out)."""
    classes = np.array(ensemble[0][1].classes)
    device = select_device(classify.device, "classify.device")
    predicted = []
    for model, card in ensemble:
        held_out = cells[cells["fold"] == card.extra["fold"]]
        probabilities = predict_crops([(model, card)], [folder / c for c in held_out["crop"]], classify.tta, device)
        predicted.append(pd.Series(classes[probabilities.argmax(1)], index=held_out.index))
    return pd.concat(predicted)


def check_translations(
    *,
    translations: Sequence[str],
    classify: ClassifyParams,
    crops: Path,
    translated: Path,
    classifier: Path,
    metrics: Path,
    plots: Path,
) -> None:
    """Score how often each translation keeps the class; write ``metrics`` and ``plots/class_kept.csv``."""
    ensemble = load_ensemble(classifier)
    untranslated = labelled(read_cells(crops, "crop"), "source").set_index("cell_id")
    predicted = _out_of_fold(ensemble, untranslated, crops, classify)
    results = {UNTRANSLATED: class_kept(untranslated.loc[predicted.index, "fine_class"], predicted)}
    for translation in translations:
        folder = translated / translation
        cells = labelled(read_cells(folder, "translate"), "source").set_index("cell_id")
        if cells.empty:  # a translation that was not trained (its metrics say why)
            continue
        predicted = _out_of_fold(ensemble, cells, folder, classify)
        results[translation] = class_kept(cells.loc[predicted.index, "fine_class"], predicted)
        results[translation]["kept_change"] = results[translation]["kept"] - results[UNTRANSLATED]["kept"]
    write_json(
        metrics,
        {
            "classifier": f"{classifier}: trained on untranslated source cells, each cell scored out of fold",
            "class_kept": results,
        },
    )
    rows = [{"cells": name, "kept": r["kept"]} for name, r in results.items()]
    write_csv(plots / "class_kept.csv", pd.DataFrame(rows).round(4))
