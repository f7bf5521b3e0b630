"""Adaptation around a classifier: AdaBN, pseudo-labels, and choosing a method without test labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import load, recipe, train_tiny_classifier
from hemaflow.classify.adapt import (
    DomainHeads,
    adapt_batch_norm,
    average_thresholded_confidence,
    choose_method,
    confident_pseudo_labels,
    costing_the_source,
    domain_heads_loss,
    forward_per_domain,
    information_maximization,
)
from hemaflow.classify.data import CellDataset, EpochSampler, build_transform, with_slice_share
from hemaflow.classify.inference import fold_logits, load_ensemble
from hemaflow.classify.model import load_classifier
from hemaflow.params import Recipe, Translation
from hemaflow.resume import file_digest
from hemaflow.translate.translate import translate


def _spot_images(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grey 8x8 images; class 1 has a bright centre. Its brightness, not its shape, is the cue."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, count)
    images = 0.3 + 0.05 * rng.standard_normal((count, 1, 8, 8))
    images[labels == 1, :, 3:5, 3:5] += 0.4
    return torch.tensor(images, dtype=torch.float32), torch.tensor(labels)


def _trained_spot_classifier() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    )
    images, labels = _spot_images(512, 0)
    optimizer = torch.optim.Adam(model.parameters(), 0.05)
    for _ in range(60):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
    return model.eval()


def _accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(images).argmax(1) == labels).float().mean())


def test_adabn_repairs_a_contrast_and_brightness_shift_and_touches_only_batch_norm_statistics():
    model = _trained_spot_classifier()
    images, labels = _spot_images(400, 1)
    shifted = 0.5 * images + 0.6  # another camera: lower contrast, brighter
    assert _accuracy(model, images, labels) > 0.95
    assert _accuracy(model, shifted, labels) < 0.7  # the shift breaks the unadapted model
    before = {k: v.clone() for k, v in model.state_dict().items()}

    layers = adapt_batch_norm(model, DataLoader(TensorDataset(shifted, labels), 64), torch.device("cpu"))

    assert layers == 1 and not model.training
    assert _accuracy(model, shifted, labels) > 0.95  # no label was used
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}  # every weight as trained
    assert model[1].momentum == 0.1


def test_adabn_leaves_a_model_without_batch_norm_unchanged():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, labels = _spot_images(32, 2)
    assert adapt_batch_norm(model, DataLoader(TensorDataset(images, labels), 8), torch.device("cpu")) == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _centre_images(count: int, seed: int, centre: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat grey 8x8 images; class 1's 2x2 centre is ``centre`` brighter (negative: darker)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, count)
    images = 0.3 + 0.05 * rng.standard_normal((count, 8, 8))
    images[labels == 1, 3:5, 3:5] += centre
    return torch.tensor(images.reshape(count, 64), dtype=torch.float32), torch.tensor(labels)


def _train_on_draws(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, share: float, epochs: int, lr: float, per_domain=False
) -> None:
    """Train on 512 source cells followed by a labelled target slice, the slice drawn at ``share`` of
    each epoch, in batches of 32; ``per_domain``: domain-specific batch norm; a ``DomainHeads`` model
    trains with its own loss."""
    from_target = torch.arange(len(labels)) >= 512
    sampler = EpochSampler(len(labels), 0, with_slice_share(None, labels.tolist(), from_target.numpy(), share))
    optimizer = torch.optim.Adam(model.parameters(), lr)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler))
        model.train()
        for start in range(0, len(order), 32):
            batch = order[start : start + 32]
            outputs = (
                forward_per_domain(model, images[batch], from_target[batch]) if per_domain else model(images[batch])
            )
            optimizer.zero_grad()
            if isinstance(model, DomainHeads):
                domain_heads_loss(outputs, labels[batch], from_target[batch], nn.CrossEntropyLoss()).backward()
            else:
                nn.functional.cross_entropy(outputs, labels[batch]).backward()
            optimizer.step()


def _few_shot_accuracies(share: float) -> tuple[float, float]:
    """(target, source) accuracy of a small network trained on 512 source cells (class 1: a bright
    centre) and a 16-cell labelled target slice (class 1: a dark centre), the slice drawn at ``share``."""
    source_images, source_labels = _centre_images(512, 0, 0.4)
    slice_images, slice_labels = _centre_images(16, 1, -0.25)
    images, labels = torch.cat([source_images, slice_images]), torch.cat([source_labels, slice_labels])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 2))
    _train_on_draws(model, images, labels, share, epochs=15, lr=0.01)
    return _accuracy(model, *_centre_images(400, 2, -0.25)), _accuracy(model, *_centre_images(400, 3, 0.4))


def test_a_small_target_slice_drawn_at_its_share_repairs_a_shift_that_its_size_alone_does_not():
    # the target's class cue is inverted: no colour or statistics method can repair that, labels can
    by_size_target, by_size_source = _few_shot_accuracies(16 / 528)
    shared_target, shared_source = _few_shot_accuracies(0.25)
    assert by_size_target < 0.6 and by_size_source > 0.95  # 16 cells among 512 are barely learnt
    assert shared_target > 0.9 and shared_source > 0.95  # a quarter of each epoch: learnt, source kept


def test_domain_batch_norm_normalises_each_domain_by_itself_and_only_the_source_moves_the_running_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).train()
    images, from_target = torch.randn(10, 3), torch.zeros(10, dtype=torch.bool)
    from_target[[1, 4, 7]] = True
    images[from_target] += 5.0  # another lab's colours

    outputs = forward_per_domain(model, images, from_target)

    for rows in (from_target, ~from_target):  # in the batch's order, each domain centred on its own mean
        assert torch.allclose(outputs[rows].mean(0), torch.zeros(4), atol=1e-5)
    source_mean = model[0](images[~from_target]).mean(0).detach()
    assert torch.allclose(model[1].running_mean, 0.1 * source_mean)  # one momentum step, from the source alone
    assert int(model[1].num_batches_tracked) == 1 and model[1].track_running_stats
    outputs.square().sum().backward()
    assert model[0].weight.grad.abs().sum() > 0  # both parts train the shared weights


def _slice_trained_spot_accuracies(per_domain: bool) -> tuple[float, float]:
    """(target, source) accuracy after AdaBN of a spot classifier trained on 512 source cells and a
    16-cell labelled slice of an inverted camera (a dark spot on a bright background), drawn at 0.25."""
    source_images, source_labels = _spot_images(512, 0)
    slice_images, slice_labels = _spot_images(16, 1)
    images, labels = torch.cat([source_images, 1.0 - slice_images]), torch.cat([source_labels, slice_labels])
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )
    _train_on_draws(model, images, labels, 0.25, epochs=10, lr=0.02, per_domain=per_domain)
    source = _accuracy(model.eval(), *_spot_images(400, 3))
    test_images, test_labels = _spot_images(400, 2)
    target = TensorDataset(1.0 - test_images, test_labels)
    adapt_batch_norm(model, DataLoader(target, 64), torch.device("cpu"))
    return _accuracy(model, *target.tensors), source


def test_a_slice_trained_with_its_own_batch_norm_is_deployed_as_trained_where_a_shared_one_fails():
    shared_target, shared_source = _slice_trained_spot_accuracies(per_domain=False)
    own_target, own_source = _slice_trained_spot_accuracies(per_domain=True)
    assert shared_target < 0.75  # trained under mixed statistics, deployed under the target's own
    assert own_target > 0.95 and own_source > 0.95 and shared_source > 0.95


class _TwoLayers(nn.Module):
    """A two-layer network with the three calls DomainHeads makes of a timm classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.features, self.head = nn.Sequential(nn.Linear(64, 32), nn.ReLU()), nn.Linear(32, 2)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return features if pre_logits else self.head(features)

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))


def _slice_pulled_accuracies(heads: bool) -> tuple[float, float]:
    """(target, source) accuracy of a network trained on 512 source cells (class 1: a bright centre)
    and a 16-cell labelled slice of a lab whose class 1 looks like the source's class 0 (a centre
    0.05 brighter; its class 0: 0.3 darker), drawn at half of each epoch; the source scored by the
    source head where there are ``heads``."""
    source_images, source_labels = _centre_images(512, 0, 0.4)
    slice_images, slice_labels = _look_alike_slice(16, 1)
    images, labels = torch.cat([source_images, slice_images]), torch.cat([source_labels, slice_labels])
    torch.manual_seed(0)
    model = DomainHeads(_TwoLayers()) if heads else _TwoLayers()
    _train_on_draws(model, images, labels, 0.5, epochs=15, lr=0.01)
    deployed = model.model if heads else model
    source_model = model.source_model() if heads else model
    return _accuracy(deployed, *_look_alike_slice(400, 2)), _accuracy(source_model, *_centre_images(400, 3, 0.4))


def _look_alike_slice(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = _centre_images(count, seed, 0.35)
    images.view(count, 8, 8)[:, 3:5, 3:5] -= 0.3
    return images, labels


def test_domain_heads_keep_the_source_that_a_slice_of_look_alike_classes_costs_one_shared_head():
    shared_target, shared_source = _slice_pulled_accuracies(heads=False)
    own_target, own_source = _slice_pulled_accuracies(heads=True)
    assert shared_source < 0.97  # the slice's labels pull source cells of the look-alike class (0.9525)
    assert own_source == 1.0  # the source head never learns the slice's labels
    assert own_target > shared_target - 0.02  # and the deployed head learns the slice as a shared one does


def test_domain_heads_loss_teaches_the_source_head_the_source_cells_only():
    torch.manual_seed(0)
    model = DomainHeads(_TwoLayers())
    images, labels = _centre_images(8, 0, 0.4)
    from_target = torch.arange(8) >= 6
    outputs = model(images)
    assert outputs.shape == (8, 4)
    torch.testing.assert_close(outputs[:, :2], model.model(images))  # the own head: the classifier as it is
    domain_heads_loss(outputs, labels, from_target, nn.CrossEntropyLoss()).backward()
    # the slice's cells reach the source head through no path: its gradient is the source cells' alone
    source_only = torch.autograd.grad(
        nn.functional.cross_entropy(model(images[:6])[:, 2:], labels[:6]), model.source_head.weight
    )[0]
    torch.testing.assert_close(model.source_head.weight.grad, source_only)
    # the source model answers as the source head does
    torch.testing.assert_close(model.source_model()(images), model(images)[:, 2:])


def test_the_fda_recipe_moves_source_cells_toward_the_target_colours():
    params = load({}).classify
    off = dict.fromkeys(["hflip", "vflip", "rot90", "affine", "brightness_contrast", "gamma", "hue_saturation"], 0.0)
    augment = params.augment.model_copy(
        update=off | {"blur": 0.0, "coarse_dropout": 0.0, "fda": params.augment.fda.model_copy(update={"p": 1.0})}
    )
    rng = np.random.default_rng(0)

    def cells(colour: list[int], count: int) -> list[np.ndarray]:
        noise = 20 * rng.standard_normal((count, 64, 64, 3))
        return list(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8))

    source, target = cells([200, 120, 160], 32), cells([120, 140, 210], 4)  # pink source, blue target
    transform = build_transform(64, (0, 0, 0), (1, 1, 1), augment, ["fda"])
    transform.set_random_seed(0)
    adapted = CellDataset(source, [0] * len(source), transform, target)
    after = np.mean([adapted[i][0].numpy().mean((1, 2)) for i in range(len(source))], 0)
    before, goal = np.mean(source, (0, 1, 2)) / 255, np.mean(target, (0, 1, 2)) / 255
    assert np.all((after - before) / (goal - before) > 0.2)  # every channel a fifth of the way or more


def test_pseudo_labels_only_above_the_threshold():
    probabilities = np.array([[0.95, 0.05], [0.6, 0.4], [0.1, 0.9], [0.2, 0.8]])
    rows, labels = confident_pseudo_labels(probabilities, ["a", "b"], 0.9)
    assert list(rows) == [0, 2] and labels == ["a", "b"]
    rows, labels = confident_pseudo_labels(probabilities, ["a", "b"], 0.99)
    assert len(rows) == 0 and labels == []


def _selection(information, slice_f1=None):
    return {
        "atc_target_accuracy": 0.5,
        "target_information": information,
        "target_labelled_cells": 0 if slice_f1 is None else 50,
        "target_labelled_coarse_macro_f1": slice_f1,
    }


def test_information_ranks_a_collapsed_confident_classifier_below_one_that_spreads_its_calls():
    """BCCD's failure: the unadapted classifier called most target cells one class, sure of itself."""
    groups = ["neutrophil", "neutrophil", "lymphocyte", "monocyte"]  # two fine neutrophil classes
    collapsed = np.tile([0.0, 0.0, 0.02, 0.98], (90, 1))  # monocyte, sure, every time
    spread = np.repeat(np.eye(4) * 0.6 + 0.1, [45, 45, 60, 30], axis=0)  # less sure, three groups
    assert information_maximization(collapsed, groups) < 0.01 < 0.2 < information_maximization(spread, groups)
    # calls split between two fine classes of one group carry no information about the group
    split_within = np.repeat([[0.95, 0.05, 0, 0], [0.05, 0.95, 0, 0]], 50, axis=0)
    assert information_maximization(split_within, groups) == pytest.approx(0, abs=1e-9)
    # at most the entropy of a uniform spread over the groups, reached by sure calls in equal shares
    assert information_maximization(np.eye(4)[[0, 2, 3] * 10], groups) == pytest.approx(np.log(3))


def test_a_labelled_target_slice_outranks_the_unsupervised_estimate():
    unlabelled = {"none": _selection(0.5), "stain": _selection(0.7), "adabn": _selection(0.6)}
    assert choose_method(unlabelled)[0] == "stain"
    labelled = {"none": _selection(0.5, 0.4), "stain": _selection(0.7, 0.5), "adabn": _selection(0.6, 0.8)}
    method, why = choose_method(labelled)
    assert method == "adabn" and "labelled target slice (0.8000, 50 cells" in why


def test_information_never_deploys_a_method_that_costs_the_labelled_source():
    """The 128 px CycleGAN run: translated training cells made the classifier surer of the target
    (the highest IM) while it lost the source's classes out of fold and the test's lead."""
    unlabelled = {"none": _selection(0.5), "cyclegan": _selection(0.9), "adabn": _selection(0.6)}
    assert choose_method(unlabelled)[0] == "cyclegan"
    method, why = choose_method(unlabelled, harms_source=["cyclegan"])
    assert method == "adabn" and why.endswith("left out for costing the source out of fold: cyclegan")
    # the target's own labels are direct evidence: a source cost does not overrule them
    labelled = {"none": _selection(0.5, 0.4), "cyclegan": _selection(0.9, 0.8)}
    assert choose_method(labelled, harms_source=["cyclegan"])[0] == "cyclegan"


def test_only_an_established_source_cost_beyond_the_tolerance_leaves_a_method_out():
    costs = {  # paired intervals of out-of-fold source macro-F1 minus none's (the stain runs)
        "stain_adabn": {"difference": -0.1676, "interval": [-0.2297, -0.1038]},
        "stain_adabn_heads": {"difference": -0.0346, "interval": [-0.1144, -0.0063]},
        "fda": {"difference": 0.0004, "interval": [-0.0357, 0.0266]},
    }
    assert costing_the_source(costs, 0.02) == ["stain_adabn"]
    assert costing_the_source(costs, 0.0) == ["stain_adabn", "stain_adabn_heads"]


def _prepared_with(tiny_models, cells: pd.DataFrame, folder: Path) -> Path:
    """A prepared folder holding the tiny models' crops and ``cells`` as its table."""
    folder.mkdir()
    (folder / "crops").symlink_to(tiny_models.prepared / "crops")
    cells.to_csv(folder / "cells.csv", index=False)
    return folder


@pytest.mark.slow
def test_the_scores_that_choose_a_method_never_read_a_test_label(tiny_models, tmp_path):
    """Relabel every test cell: the selection scores, and so the choice, stay exactly the same."""
    cells = pd.read_csv(tiny_models.prepared / "cells.csv", keep_default_na=False)
    assert (cells["role"] == "test").any() and (cells["role"] == "target").any()
    test = cells["role"] == "test"
    cells.loc[test, "fine_class"] = np.roll(cells.loc[test, "fine_class"].to_numpy(), 1)
    relabelled = _prepared_with(tiny_models, cells, tmp_path / "relabelled")
    method = Recipe(**recipe(adabn=True))
    selections = [
        train_tiny_classifier(tiny_models, tmp_path / prepared.name, prepared=prepared, recipe=method, epochs=1)[
            "selection"
        ]
        for prepared in (tiny_models.prepared, relabelled)
    ]
    assert selections[0] == selections[1] and selections[0]["target_information"] is not None


@pytest.mark.slow
def test_domain_batch_norm_reaches_the_training_of_a_labelled_target_slice(tiny_models, tmp_path):
    """Every other test cell made a labelled slice: with domain_batch_norm the fold models learn
    other weights than with one shared batch norm, and every slice cell is still scored out of fold."""
    cells = pd.read_csv(tiny_models.prepared / "cells.csv", keep_default_na=False)
    test = cells.index[cells["role"] == "test"]
    cells.loc[test[::2], "role"] = "target_labelled"
    assert (cells["role"] == "target_labelled").sum() >= 4
    prepared = _prepared_with(tiny_models, cells, tmp_path / "prepared")
    weights, scored = {}, {}
    for own in (False, True):
        out = tmp_path / f"own{own}"
        method = Recipe(**recipe(adabn=True, few_shot=True), domain_batch_norm=own)
        metrics = train_tiny_classifier(tiny_models, out, prepared=prepared, recipe=method, epochs=1, folds=2)
        weights[own] = file_digest(out / "models" / "fold0.safetensors")
        scored[own] = metrics["selection"]["target_labelled_cells"]
    assert weights[True] != weights[False]  # the option changed how the slice's batches trained
    assert scored[True] == scored[False] == (cells["role"] == "target_labelled").sum()


@pytest.mark.slow
@pytest.mark.parametrize(
    "method",
    [
        Recipe(**recipe(adabn=True, few_shot=True), domain_heads=True),
        # the source head: the half of the draws not augmented
        Recipe(**recipe(augment=["stain"], adabn=True), domain_heads=True, augment_share=0.5),
        # the source head: the half of the draws not translated, and it scores untranslated cells
        Recipe(**recipe(translate="reinhard", adabn=True), domain_heads=True, augment_share=0.5),
    ],
    ids=["slice", "stain", "translation"],
)
def test_domain_heads_score_the_source_out_of_fold_by_the_saved_source_models(method, tiny_models, tmp_path):
    """With domain_heads the out-of-fold source calls are those of the source lab's saved fold models
    on the cells as that lab shows them (untranslated), the deployed fold models are others, and the
    metrics say what these would cost the source."""
    cells = pd.read_csv(tiny_models.prepared / "cells.csv", keep_default_na=False)
    test = cells.index[cells["role"] == "test"]
    cells.loc[test[::2], "role"] = "target_labelled"
    cells.loc[test[::2], "fold"] = np.arange(len(test[::2])) % 2  # each fold model trains on slice cells
    prepared = _prepared_with(tiny_models, cells, tmp_path / "prepared")
    translated = tiny_models.cells
    if method.translate is not Translation.none:
        translated = tmp_path / "translated"
        translate(
            method=method.translate,
            reference_cells=8,
            seed=0,
            crops=tiny_models.crops,
            prepared=prepared,
            translator=None,
            out=translated,
            metrics=tmp_path / "translate.json",
            plots=tmp_path / "translate_plots",
        )
    metrics = train_tiny_classifier(
        tiny_models, tmp_path, prepared=prepared, cells=translated, recipe=method, epochs=1, folds=2
    )
    models = tmp_path / "models"
    oof = pd.read_csv(models / "oof.csv", keep_default_na=False)
    untranslated = pd.read_csv(tiny_models.crops / "cells.csv", keep_default_na=False)
    crops = dict(zip(untranslated["cell_id"], untranslated["crop"], strict=True))
    tta = load(yaml.safe_load(tiny_models.params_file.read_text())).classify.tta
    for fold in (0, 1):
        held_out = oof[oof["fold"] == fold]
        source_model = load_classifier(models / "source" / f"fold{fold}")
        paths = [tiny_models.crops / crops[c] for c in held_out["cell_id"]]
        logits = fold_logits([source_model], paths, tta, torch.device("cpu"))
        assert [source_model[1].classes[i] for i in logits[0].argmax(1)] == list(held_out["predicted"])
        calibrated = torch.from_numpy(logits[0] / source_model[1].temperature).softmax(1).max(1).values.numpy()
        assert calibrated == pytest.approx(held_out["confidence"].to_numpy(), abs=1e-5)  # these very cells
        deployed = load_file(models / f"fold{fold}.safetensors")
        source_weights = load_file(models / "source" / f"fold{fold}.safetensors")
        assert not torch.equal(deployed["fc.weight"], source_weights["fc.weight"])
    assert 0 <= metrics["adaptation"]["deployed_model_oof_macro_f1"] <= 1
    assert len(load_ensemble(models)) == 2  # the source models do not join the deployed ensemble


def test_atc_counts_target_cells_less_sure_than_every_source_cell_as_errors_even_at_full_source_accuracy():
    source, correct = np.array([0.8, 0.9, 0.95]), np.ones(3, bool)
    assert average_thresholded_confidence(source, correct, np.array([0.5, 0.85, 0.99, 0.7])) == 0.5
