"""The command line explains itself and fails in one line that names the file, row or key."""

from __future__ import annotations

import click
import pytest
import typer
import yaml
from typer.testing import CliRunner

from conftest import REPO, params_data, shared_dataset
from hemaflow.cli import app

runner = CliRunner()
ROOT = typer.main.get_command(app)


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], click.Command]]:
    found = []
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            found += _commands(command, (*prefix, name))
        else:
            found.append(((*prefix, name), command))
    return found


COMMANDS = _commands(ROOT)


def test_every_dvc_stage_has_a_command_of_its_name():
    stages = {name.split("@")[0] for name in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]}
    names = {path[-1].replace("-", "_") for path, _ in COMMANDS}
    assert {s for s in stages if s != "translate_cyclegan"} <= names


@pytest.mark.parametrize("path,command", COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_every_command_and_option_is_explained(path, command):
    result = runner.invoke(app, [*path, "--help"])
    assert result.exit_code == 0
    summary = command.help.strip().splitlines()[0]
    assert summary.split()[0] in result.output and command.help.strip()
    for param in command.params:
        if isinstance(param, click.Option) and param.name != "help":
            assert param.help, f"{' '.join(path)} {param.opts[0]} has no help"
            assert param.opts[0] in result.output


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("hemaflow ")


def _one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output, result.output
    return lines[0]


def test_bad_params_are_one_line_naming_the_key(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params_data({"prepare": {"crop": {"pixel": 10}}})))
    result = runner.invoke(
        app,
        [
            "prepare",
            "--params",
            str(tmp_path / "params.yaml"),
            "--out",
            str(tmp_path / "p"),
            "--metrics",
            str(tmp_path / "m.json"),
            "--plots",
            str(tmp_path / "plots"),
        ],
    )
    assert "prepare.crop.pixel: unknown key" in _one_line_error(result)


def test_missing_dataset_folder_is_one_line(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params_data({"prepare": {"root": str(tmp_path / "nowhere")}})))
    result = runner.invoke(
        app,
        [
            "prepare",
            "--params",
            str(tmp_path / "params.yaml"),
            "--out",
            str(tmp_path / "p"),
            "--metrics",
            str(tmp_path / "m.json"),
            "--plots",
            str(tmp_path / "plots"),
        ],
    )
    line = _one_line_error(result)
    assert f"prepare.datasets.0.path: {tmp_path / 'nowhere' / 'acevedo'} not found (dataset 'acevedo')" in line


def test_report_before_prepare_says_what_to_run(tmp_path):
    assert "dvc repro prepare" in _one_line_error(runner.invoke(app, ["data", "report", "--prepared", str(tmp_path)]))


def test_import_of_an_uncalibrated_format_estimates_the_scale(tmp_path):
    source = shared_dataset("cellavision_blog")
    result = runner.invoke(
        app, ["data", "import", "segmentation_wbc", str(source), "--name", "cv", "--raw-dir", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    assert (
        result.output.startswith("px_per_um auto: ") and "red cells in 100 images" in result.output
    )  # the whole folder
    entry = yaml.safe_load(result.output.split("params.yaml (role: source, target or test):\n", 1)[1])[0]
    assert entry["px_per_um"] == "auto"


def test_import_rejects_a_wrong_layout(tmp_path):
    (tmp_path / "flat.jpg").write_bytes(b"")
    result = runner.invoke(
        app, ["data", "import", "matek19", str(tmp_path), "--name", "x", "--raw-dir", str(tmp_path / "raw")]
    )
    assert "one sub-folder per class" in _one_line_error(result)
    assert not (tmp_path / "raw" / "x").exists()


def test_import_real_acevedo_copies_and_prints_the_params_entry(tmp_path):
    source = shared_dataset("acevedo20_subset")
    result = runner.invoke(
        app, ["data", "import", "acevedo20", str(source), "--name", "pbc", "--raw-dir", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    assert "pbc: 1200 cells" in result.output
    entry = yaml.safe_load(result.output.split("params.yaml (role: source, target or test):\n", 1)[1])[0]
    assert entry == {"name": "pbc", "format": "acevedo20", "path": "pbc", "role": "source", "px_per_um": 10.0}
    assert len(list((tmp_path / "pbc" / "ig").iterdir())) == 150


def test_gpu_profile_becomes_valid_dvc_overrides():
    result = runner.invoke(
        app, ["params", "overrides", str(REPO / "profiles" / "gpu.yaml"), "--params", str(REPO / "params.yaml")]
    )
    assert result.exit_code == 0, result.output
    assert "-S 'prepare.crop.pixels=224'" in result.output and "-S 'demo_data.workers=16'" in result.output


def test_predict_without_trained_models_says_what_to_run(tmp_path):
    image = tmp_path / "smear.jpg"
    image.write_bytes(b"")
    result = runner.invoke(
        app,
        [
            "predict",
            str(image),
            "--out",
            str(tmp_path / "p.csv"),
            "--px-per-um",
            "10",
            "--detector",
            str(tmp_path / "nothing"),
        ],
    )
    assert "no trained detector (run `dvc repro train_detector`)" in _one_line_error(result)


def test_classify_without_models_says_what_to_run(tmp_path):
    result = runner.invoke(
        app, ["classify", str(tmp_path), "--out", str(tmp_path / "c.csv"), "--models", str(tmp_path / "none")]
    )
    assert "no fold models (run `dvc repro train_classifier`)" in _one_line_error(result)


def test_translate_images_rejects_an_unknown_direction(tmp_path):
    result = runner.invoke(app, ["translate-images", str(tmp_path), "--out", str(tmp_path / "o"), "--to", "sideways"])
    assert "--to: expected `target` or `source`" in _one_line_error(result)


def test_stage_commands_name_the_missing_input(tmp_path):
    common = ["--metrics", str(tmp_path / "m.json"), "--plots", str(tmp_path / "p")]
    result = runner.invoke(
        app,
        [
            "train-classifier",
            "--method",
            "none",
            "--cells",
            str(tmp_path / "nothing"),
            "--crops",
            str(tmp_path / "nothing"),
            "--prepared",
            str(tmp_path / "nothing"),
            "--out",
            str(tmp_path / "o"),
            "--state",
            str(tmp_path / "s"),
            *common,
        ],
    )
    assert f"{tmp_path / 'nothing' / 'cells.csv'}: not found (run `dvc repro translate` first)" in _one_line_error(
        result
    )
    result = runner.invoke(
        app,
        [
            "crop",
            "--prepared",
            str(tmp_path),
            "--detections",
            str(tmp_path),
            "--out",
            str(tmp_path / "c"),
            "--metrics",
            str(tmp_path / "m.json"),
        ],
    )
    assert "cells.csv: not found (run `dvc repro prepare` first)" in _one_line_error(result)
