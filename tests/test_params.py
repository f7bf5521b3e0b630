from __future__ import annotations

import pytest
import yaml

from conftest import REPO
from hemaflow.params import ParamsError, load_params, parse_params


def _params(**prepare_overrides) -> dict:
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["prepare"].update(prepare_overrides)
    return data


def test_repository_params_are_valid():
    params = load_params(REPO / "params.yaml")
    assert {d.role.value for d in params.prepare.datasets} == {"source", "target", "test"}


def test_unknown_nested_key_is_named_with_its_full_path():
    data = _params()
    data["prepare"]["crop"]["fov_umm"] = 25
    with pytest.raises(ParamsError, match=r"prepare\.crop\.fov_umm: unknown key"):
        parse_params(data)


def test_wrong_type_names_key_and_expected_type():
    with pytest.raises(ParamsError, match=r"prepare\.folds: Input should be a valid integer.*'five'"):
        parse_params(_params(folds="five"))


def test_every_bad_key_is_reported_at_once():
    data = _params(folds=1)
    data["prepare"]["datasets"][0]["format"] = "jpeg_pile"
    with pytest.raises(ParamsError) as error:
        parse_params(data)
    assert "prepare.folds" in str(error.value)
    assert "prepare.datasets.0.format" in str(error.value) and "acevedo20" in str(error.value)


def test_validation_fold_must_exist():
    with pytest.raises(ParamsError, match="val_fold=5 must be below folds=5"):
        parse_params(_params(val_fold=5))


def test_a_labelled_source_is_required():
    data = _params()
    data["prepare"]["datasets"] = [d for d in data["prepare"]["datasets"] if d["role"] != "source"]
    with pytest.raises(ParamsError, match="role 'source'"):
        parse_params(data)


def test_missing_and_malformed_files_name_the_file(tmp_path):
    with pytest.raises(ParamsError, match="nope.yaml: file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("prepare: [unclosed\n")
    with pytest.raises(ParamsError, match="bad.yaml: not valid YAML"):
        load_params(bad)
