"""Stain translation: the CycleGAN networks and recipe, the classic normalisers, resume, the stage."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from conftest import kill_when
from hemaflow.params import AdaptationMethod, CycleGanParams, ParamsError, parse_params
from hemaflow.translate.cyclegan import ImagePool, PatchDiscriminator, ResnetGenerator
from hemaflow.translate.domain import FeatureNet, kernel_distance, mean_ssim
from hemaflow.translate.normalizers import fit_normalizer


def _millions(module: torch.nn.Module) -> float:
    return round(sum(p.numel() for p in module.parameters()) / 1e6, 3)


def test_networks_match_the_reference_sizes():
    # The reference implementation prints 11.378 M (resnet_9blocks, ngf 64) and 2.765 M (basic D, ndf 64).
    assert _millions(ResnetGenerator(64, 9, "transpose")) == 11.378
    assert _millions(PatchDiscriminator(64)) == 2.765


@pytest.mark.parametrize("upsample", ["transpose", "resize"])
def test_generator_keeps_the_image_size_and_range(upsample):
    image = torch.rand(2, 3, 64, 64) * 2 - 1
    out = ResnetGenerator(8, 2, upsample)(image)
    assert out.shape == image.shape and out.abs().max() <= 1


def test_patchgan_scores_70_pixel_patches():
    scores = PatchDiscriminator(8)(torch.zeros(1, 3, 256, 256))
    assert scores.shape == (1, 1, 30, 30)  # the reference's 30x30 patch grid at 256 px


def test_image_pool_fills_then_mixes_history():
    pool = ImagePool(4, random.Random(0))
    first = pool.query(torch.arange(4.0).view(4, 1, 1, 1))
    assert first.flatten().tolist() == [0, 1, 2, 3]  # filling: the new images pass through
    mixed = pool.query(torch.full((64, 1, 1, 1), 9.0)).flatten()
    assert 0 < (mixed < 9).sum() < 64  # about half of later queries come from the history
    assert ImagePool(0, random.Random(0)).query(first) is first


def test_translate_params_are_validated():
    base = yaml.safe_load(open("params.yaml"))
    base["translate"]["method"] = "cyclegan"
    base["translate"]["methods"] = ["none", "reinhard"]
    with pytest.raises(ParamsError, match="translate.method=cyclegan is not in translate.methods"):
        parse_params(base)
    base["translate"]["methods"] = ["cyclegan"]
    base["translate"]["cyclegan"]["img_size"] = 30
    with pytest.raises(ParamsError, match="translate.cyclegan.img_size"):
        parse_params(base)
    assert CycleGanParams().n_blocks == 9 and CycleGanParams().lambda_identity == 0.5  # the reference recipe


def _stained(colour, rng, n=12):
    images = []
    for _ in range(n):
        image = np.full((48, 48, 3), 235, np.uint8)
        yy, xx = np.mgrid[:48, :48]
        cx, cy = rng.uniform(16, 32, 2)
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < 100] = colour
        images.append(np.clip(image + rng.normal(0, 3, image.shape), 0, 255).astype(np.uint8))
    return images


def test_reinhard_moves_the_colours_to_the_target():
    rng = np.random.default_rng(0)
    source, target = _stained((90, 40, 140), rng), _stained((60, 110, 70), rng)
    normalise = fit_normalizer(AdaptationMethod.reinhard, target)
    moved = [normalise(image) for image in source]
    gap_before = np.abs(np.mean(source, axis=(0, 1, 2)) - np.mean(target, axis=(0, 1, 2))).sum()
    gap_after = np.abs(np.mean(moved, axis=(0, 1, 2)) - np.mean(target, axis=(0, 1, 2))).sum()
    assert moved[0].shape == source[0].shape and moved[0].dtype == np.uint8
    assert gap_after < gap_before / 3


def test_macenko_reports_an_image_it_cannot_fit():
    rng = np.random.default_rng(0)
    normalise = fit_normalizer(AdaptationMethod.macenko, _stained((60, 110, 70), rng))
    assert normalise(np.full((48, 48, 3), 250, np.uint8)) is None  # no stained pixel at all


def test_ssim_and_kid_tell_similar_from_different():
    rng = np.random.default_rng(0)
    a, b = _stained((90, 40, 140), rng, 24), _stained((60, 110, 70), rng, 24)
    assert mean_ssim(a, a) == pytest.approx(1.0, abs=1e-5)
    net = FeatureNet()
    same = kernel_distance(net, a[:12], a[12:], 0)["mean"]
    different = kernel_distance(net, a[:12], b[:12], 0)["mean"]
    assert different > same + 10 * abs(same)


def _tiny_gan_params(params_file, tmp_path, **cyclegan):
    data = yaml.safe_load(params_file.read_text())
    tiny = {"img_size": 32, "ngf": 8, "ndf": 8, "n_blocks": 1, "epochs": 1, "epochs_decay": 1, "batch_size": 4}
    data["translate"]["cyclegan"].update(tiny | cyclegan)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _train_command(prepared, params_file, root):
    return [sys.executable, "-m", "hemaflow", "train-translator", "--params", str(params_file), "--prepared", str(prepared),
            "--out", str(root / "translator"), "--metrics", str(root / "metrics.json"), "--plots", str(root / "plots"),
            "--state", str(root / "state")]  # fmt: skip


def _run(command):
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.mark.slow
def test_translator_trains_translates_and_keeps_labels(tiny_prepared, tmp_path):
    prepared, params_file = tiny_prepared
    tiny = _tiny_gan_params(params_file, tmp_path)
    _run(_train_command(prepared, tiny, tmp_path))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and set(metrics["final_losses"]) >= {"G_A", "cycle_A", "idt_A", "D_A"}
    assert (tmp_path / "plots" / "samples.png").stat().st_size > 1000
    assert not list((tmp_path / "state").iterdir())  # the resume state goes once the model is written

    cells = pd.read_csv(prepared / "cells.csv", keep_default_na=False)
    source = cells[(cells["role"] == "source") & (cells["fine_class"] != "")]
    # a detector that finds every training-field cell 2 px off its true box
    on_fields = source[source["x1"] != ""]
    boxes = on_fields[["x1", "y1", "x2", "y2"]].astype(float)
    detections = boxes.assign(image=on_fields["image"], x1=boxes["x1"] + 2, x2=boxes["x2"] + 2, score=0.9)
    (tmp_path / "detections").mkdir()
    for split in ("train", "val"):
        detections[on_fields["split"] == split].to_csv(tmp_path / "detections" / f"{split}.csv", index=False)

    out = tmp_path / "translated"
    _run([sys.executable, "-m", "hemaflow", "translate-cells", "--params", str(tiny), "--method", "cyclegan",
          "--prepared", str(prepared), "--translator", str(tmp_path / "translator"), "--out", str(out),
          "--detections", str(tmp_path / "detections"),
          "--metrics", str(tmp_path / "cyclegan.json"), "--plots", str(tmp_path / "cg_plots")])  # fmt: skip
    translated = pd.read_csv(out / "cells.csv", keep_default_na=False)
    assert list(translated["cell_id"]) == list(source["cell_id"])
    assert list(translated["fine_class"]) == list(source["fine_class"])  # labels kept
    assert (translated["crop_from"] == "detection").sum() == len(on_fields) > 0  # smear cells cut as at inference
    assert set(translated.loc[translated["x1"] == "", "crop_from"]) == {"image"}
    first = Image.open(out / translated["crop"].iloc[0])
    assert first.size == Image.open(prepared / source["crop"].iloc[0]).size
    scores = json.loads((tmp_path / "cyclegan.json").read_text())
    assert 0 < scores["ssim_luminance"] < 1 and scores["cells"] == len(source)
    assert scores["crops_from"]["detection"] == len(on_fields) and 0.5 < scores["mean_match_giou"] < 1

    apply_dir = tmp_path / "applied"
    _run([sys.executable, "-m", "hemaflow", "translate", str(prepared / source["crop"].iloc[0]), "--out", str(apply_dir),
          "--model", str(tmp_path / "translator"), "--params", str(tiny)])  # fmt: skip
    assert len(list(apply_dir.glob("*.png"))) == 1


@pytest.mark.slow
def test_a_killed_translator_resumes_and_ends_as_an_uninterrupted_one(tiny_prepared, tmp_path):
    prepared, params_file = tiny_prepared
    tiny = _tiny_gan_params(params_file, tmp_path, epochs=3, epochs_decay=3)
    _run(_train_command(prepared, tiny, tmp_path / "whole"))

    command = _train_command(prepared, tiny, tmp_path / "killed")
    state = tmp_path / "killed" / "state" / "cyclegan.state.pt"
    kill_when(command, lambda: state.exists() and torch.load(state, weights_only=True)["epoch"] >= 2)
    resumed = _run(command)
    assert "resuming after epoch" in resumed.stdout + resumed.stderr

    def losses(root):
        return json.loads((root / "metrics.json").read_text())["final_losses"]

    assert losses(tmp_path / "killed") == pytest.approx(losses(tmp_path / "whole"), rel=1e-5)
