"""params.yaml is validated at load, documented from its schema, and checked for names before anything runs."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from conftest import REPO, params_data, recipe
from hemaflow.cli import app
from hemaflow.params import ParamsError, load_params, params_markdown, parse_params

runner = CliRunner()


def test_repository_params_are_valid():
    params = load_params(REPO / "params.yaml")
    assert {d.role.value for d in params.prepare.datasets} == {"source", "target", "test"}


def test_unknown_nested_key_is_named_with_its_full_path():
    data = params_data({"prepare": {"crop": {"fov_umm": 25}}})
    with pytest.raises(ParamsError, match=r"prepare\.crop\.fov_umm: unknown key"):
        parse_params(data)


def test_a_missing_key_is_named_because_params_yaml_holds_every_value():
    data = params_data()
    del data["classify"]["epochs"]
    with pytest.raises(ParamsError, match=r"classify\.epochs: missing"):
        parse_params(data)


def test_wrong_type_names_key_and_expected_type():
    with pytest.raises(ParamsError, match=r"prepare\.folds: Input should be a valid integer.*'five'"):
        parse_params(params_data({"prepare": {"folds": "five"}}))


def test_every_bad_key_is_reported_at_once():
    data = params_data({"prepare": {"folds": 1}})
    data["prepare"]["datasets"][0]["format"] = "jpeg_pile"
    with pytest.raises(ParamsError) as error:
        parse_params(data)
    assert "prepare.folds" in str(error.value)
    assert "prepare.datasets.0.format" in str(error.value) and "acevedo20" in str(error.value)


def test_cross_section_rules():
    with pytest.raises(ParamsError, match="val_fold=5 must be below folds=5"):
        parse_params(params_data({"prepare": {"val_fold": 5}}))
    data = params_data()
    data["prepare"]["datasets"] = [d for d in data["prepare"]["datasets"] if d["role"] != "source"]
    with pytest.raises(ParamsError, match="role 'source'"):
        parse_params(data)
    with pytest.raises(ParamsError, match=r"adapt\.methods\.reinhard\.translate=reinhard is not in translate\.methods"):
        parse_params(params_data({"adapt": {"methods": {"reinhard": recipe("reinhard")}, "deploy": "auto"}}))
    with pytest.raises(ParamsError, match="deploy=nothing is neither auto nor one of the methods"):
        parse_params(params_data({"adapt": {"deploy": "nothing"}}))
    with pytest.raises(ParamsError, match=r"adapt\.methods\.few\.few_shot needs a dataset with role: target_labelled"):
        parse_params(params_data({"adapt": {"methods": {"few": recipe(few_shot=True)}}}))
    data = params_data({"adapt": {"methods": {"few": recipe(few_shot=True)}}, "classify": {"folds": 1}})
    data["prepare"]["datasets"].append({**data["prepare"]["datasets"][2], "name": "slice", "role": "target_labelled"})
    with pytest.raises(ParamsError, match=r"adapt\.methods\.few\.few_shot needs classify\.folds >= 2"):
        parse_params(data)
    data = params_data({"adapt": {"methods": {"few": {**recipe(few_shot=True), "domain_batch_norm": True}}}})
    data["prepare"]["datasets"].append({**data["prepare"]["datasets"][2], "name": "slice", "role": "target_labelled"})
    with pytest.raises(ParamsError, match=r"adapt\.methods\.few\.domain_batch_norm needs few_shot and adabn"):
        parse_params(data)
    data["adapt"]["methods"]["few"]["adabn"] = True
    data["classify"]["augment"]["mixup_alpha"] = 0.2
    with pytest.raises(ParamsError, match=r"adapt\.methods\.few\.domain_batch_norm: mixup and cutmix blend"):
        parse_params(data)
    data["adapt"]["methods"]["few"] |= {"domain_batch_norm": False, "domain_heads": True}
    with pytest.raises(ParamsError, match=r"adapt\.methods\.few\.domain_heads: mixup and cutmix blend"):
        parse_params(data)
    data["classify"]["augment"]["mixup_alpha"] = 0.0
    data["classify"]["head"] = "knn"
    with pytest.raises(ParamsError, match=r"adapt\.methods\.few\.domain_heads needs a trained head"):
        parse_params(data)
    data["adapt"]["methods"]["few"]["few_shot"] = False
    with pytest.raises(
        ParamsError, match=r"adapt\.methods\.few\.domain_heads needs few_shot, an augment or a translation"
    ):
        parse_params(data)
    data["classify"]["head"] = "finetune"
    data["adapt"]["methods"]["few"]["augment_share"] = 0.5  # nothing to share: a silent no-op otherwise
    with pytest.raises(
        ParamsError, match=r"adapt\.methods\.few: .*augment_share=0\.5 has no augment or translation to share"
    ):
        parse_params(data)
    data["adapt"]["methods"]["few"] |= {"augment": ["stain"], "augment_share": 1.0}
    with pytest.raises(
        ParamsError, match=r"adapt\.methods\.few: .*domain_heads with an augment or a translation needs"
    ):
        parse_params(data)
    data["adapt"]["methods"]["few"]["augment_share"] = 0.5  # the source head: the draws without the augmentation
    parse_params(data)
    data["translate"]["methods"] = ["none", "reinhard"]
    data["adapt"]["methods"]["few"] |= {"augment": [], "translate": "reinhard", "augment_share": 1.0}
    with pytest.raises(ParamsError, match=r"adapt\.methods\.few: .*domain_heads with an augment or a translation"):
        parse_params(data)
    data["adapt"]["methods"]["few"]["augment_share"] = 0.5  # the source head: the draws left untranslated
    parse_params(data)
    data = params_data()
    data["prepare"]["datasets"][0]["detector_boxes"] = True  # the demo's first dataset is a source
    with pytest.raises(
        ParamsError, match=r"prepare\.datasets\.0: .*detector_boxes is for role target only, not source"
    ):
        parse_params(data)
    data = params_data()
    data["prepare"]["datasets"] = [d for d in data["prepare"]["datasets"] if d["role"] != "target"]
    data["translate"] |= {"methods": ["none"], "cyclegan": data["translate"]["cyclegan"] | {"train": False}}
    data["adapt"] = {"methods": {"none": recipe(), "adabn": recipe(adabn=True)}, "deploy": "auto"}
    with pytest.raises(ParamsError, match=r"adapt\.methods\.adabn: adabn need\(s\) unlabelled target cells"):
        parse_params(data)


def test_missing_and_malformed_files_name_the_file(tmp_path):
    with pytest.raises(ParamsError, match="nope.yaml: file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("prepare: [unclosed\n")
    with pytest.raises(ParamsError, match="bad.yaml: not valid YAML"):
        load_params(bad)


def test_the_params_reference_is_current_and_documents_every_key():
    assert (REPO / "docs" / "params.md").read_text() == params_markdown(), "run `hemaflow params docs`"
    documented = params_markdown()
    for section, values in yaml.safe_load((REPO / "params.yaml").read_text()).items():
        for key in values:
            assert f"`{section}.{key}" in documented, f"{section}.{key}"
    assert "| `classify.epochs` | int | > 0 |" in documented


def test_params_check_names_a_misspelt_backbone_and_a_missing_dataset_folder(tmp_path):
    data = params_data({"model": {"backbone": "resnet181"}, "prepare": {"root": str(tmp_path)}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    result = runner.invoke(app, ["params", "check", "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    message = result.output.strip()
    assert message.count("\n") == 0, "one line"
    assert "model.backbone: unknown timm model 'resnet181'" in message and "resnet18" in message
    assert f"prepare.datasets.0.path: {tmp_path / 'acevedo'} not found" in message


def test_params_check_accepts_params_whose_names_all_resolve(tiny_prepared):
    _, params_file = tiny_prepared
    result = runner.invoke(app, ["params", "check", "--params", str(params_file)])
    assert result.exit_code == 0, result.output
