from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from conftest import REPO, shared_dataset
from hemaflow.cli import app

runner = CliRunner()


def test_help_lists_one_command_per_stage_and_the_utilities():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("demo-data", "prepare", "train-translator", "translate-cells", "train-classifier", "train-detector",
                    "detect-splits", "evaluate", "compare", "predict", "translate", "data", "params"):
        assert command in result.output


@pytest.mark.parametrize("command", [["demo-data"], ["prepare"], ["data", "import"], ["data", "report"], ["params", "overrides"],
                                     ["train-translator"], ["translate-cells"], ["evaluate"], ["compare"], ["predict"]])
def test_every_command_explains_itself(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output and len(result.output) > 200


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("hemaflow ")


def test_bad_params_are_one_line_naming_the_key(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["prepare"]["crop"]["pixel"] = 10
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = runner.invoke(app, ["prepare", "--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "p")])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [f"error: {tmp_path / 'params.yaml'}: prepare.crop.pixel: unknown key " + lines[0].split("unknown key ")[1]]
    assert "Traceback" not in result.output


def test_missing_dataset_folder_is_one_line(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["prepare"]["root"] = str(tmp_path / "nowhere")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = runner.invoke(app, ["prepare", "--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "p")])
    assert result.exit_code == 1 and "dataset 'acevedo' (acevedo20)" in result.output and "not found" in result.output


def test_report_before_prepare_says_what_to_run(tmp_path):
    result = runner.invoke(app, ["data", "report", "--prepared", str(tmp_path)])
    assert result.exit_code == 1 and "dvc repro prepare" in result.output


def test_import_needs_a_scale_when_the_format_has_none(tmp_path):
    result = runner.invoke(app, ["data", "import", "bccd", str(tmp_path), "--name", "x"])
    assert result.exit_code == 1 and "--px-per-um" in result.output


def test_import_rejects_a_wrong_layout(tmp_path):
    (tmp_path / "flat.jpg").write_bytes(b"")
    result = runner.invoke(app, ["data", "import", "matek19", str(tmp_path), "--name", "x", "--raw-dir", str(tmp_path / "raw")])
    assert result.exit_code == 1 and "one sub-folder per class" in result.output
    assert not (tmp_path / "raw" / "x").exists()


def test_import_real_acevedo_copies_and_prints_the_params_entry(tmp_path):
    source = shared_dataset("acevedo20_subset")
    result = runner.invoke(app, ["data", "import", "acevedo20", str(source), "--name", "pbc", "--raw-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "pbc: 1200 cells" in result.output
    entry = yaml.safe_load(result.output.split("params.yaml (role: source, target or test):\n", 1)[1])[0]
    assert entry == {"name": "pbc", "format": "acevedo20", "path": "pbc", "role": "source", "px_per_um": 10.0}
    assert len(list((tmp_path / "pbc" / "ig").iterdir())) == 150


def test_gpu_profile_becomes_valid_dvc_overrides():
    result = runner.invoke(app, ["params", "overrides", str(REPO / "profiles" / "gpu.yaml"), "--params", str(REPO / "params.yaml")])
    assert result.exit_code == 0, result.output
    assert "-S 'prepare.crop.pixels=224'" in result.output and "-S 'demo_data.workers=16'" in result.output


def test_predict_without_trained_models_says_what_to_run(tmp_path):
    image = tmp_path / "smear.jpg"
    image.write_bytes(b"")
    result = runner.invoke(app, ["predict", str(image), "--out", str(tmp_path / "p.csv"), "--px-per-um", "10",
                                 "--classifier", str(tmp_path / "nothing")])  # fmt: skip
    assert result.exit_code == 1
    assert "no fold models (run `dvc repro train_classifier`)" in result.output and "Traceback" not in result.output


def test_translate_rejects_an_unknown_direction(tmp_path):
    result = runner.invoke(app, ["translate", str(tmp_path), "--out", str(tmp_path / "o"), "--to", "sideways"])
    assert result.exit_code == 1 and "--to: expected `target` or `source`" in result.output
