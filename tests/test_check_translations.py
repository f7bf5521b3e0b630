"""A translation that changes cells' classes shows it: the class-kept check by hand and on the tiny pipeline."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from conftest import load
from hemaflow.evaluate.translations import check_translations, class_kept


def test_a_translation_that_paints_neutrophils_into_lymphocytes_shows_it():
    truth = pd.Series(["neutrophil"] * 4 + ["lymphocyte"] * 2)
    predicted = pd.Series(["lymphocyte", "lymphocyte", "lymphocyte", "neutrophil", "lymphocyte", "lymphocyte"])
    kept = class_kept(truth, predicted)
    assert kept["kept"] == pytest.approx(3 / 6)
    neutrophil = kept["per_class"]["neutrophil"]
    assert neutrophil == {"kept": 0.25, "cells": 4, "mostly_became": "lymphocyte", "mostly_became_share": 0.75}
    assert kept["per_class"]["lymphocyte"] == {
        "kept": 1.0,
        "cells": 2,
        "mostly_became": None,
        "mostly_became_share": 0.0,
    }


@pytest.mark.slow
def test_untranslated_cells_score_as_out_of_fold_and_an_identity_translation_changes_nothing(tiny_models, tmp_path):
    translated = tmp_path / "translated"
    shutil.copytree(tiny_models.cells, translated / "none")
    check_translations(
        translations=["none"],
        classify=load().classify,
        crops=tiny_models.crops,
        translated=translated,
        classifier=tiny_models.classifier,
        metrics=tmp_path / "check.json",
        plots=tmp_path / "plots",
    )
    kept = json.loads((tmp_path / "check.json").read_text())["class_kept"]
    training = json.loads((tiny_models.root / "classify.json").read_text())
    # each cell by the fold model that never saw it: the training stage's own out-of-fold accuracy
    assert kept["untranslated"]["kept"] == pytest.approx(training["oof"]["accuracy"])
    assert kept["none"]["kept_change"] == 0 and kept["none"]["per_class"] == kept["untranslated"]["per_class"]
    assert list(pd.read_csv(tmp_path / "plots" / "class_kept.csv")["cells"]) == ["untranslated", "none"]
