from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from conftest import load
from hemaflow.classify.data import EpochSampler, class_weights, with_adapted_copies, with_slice_share
from hemaflow.classify.inference import average_probabilities
from hemaflow.classify.model import (
    BACKBONE_ALIASES,
    create_classifier,
    load_classifier,
    resolve_backbone,
    save_classifier,
)
from hemaflow.errors import HemaflowError

MODEL = load().model


def model_params(**changes):
    return MODEL.model_copy(update=changes)


@pytest.mark.parametrize("alias", sorted(BACKBONE_ALIASES))
def test_every_alias_names_a_timm_model(alias):
    assert resolve_backbone(alias) in timm.list_models()


def test_exact_names_pass_and_unknown_names_suggest_close_ones():
    assert resolve_backbone("efficientnetv2_m") == "efficientnetv2_m"
    with pytest.raises(HemaflowError, match=r"unknown timm model 'resnet181'.*close matches: .*resnet18"):
        resolve_backbone("resnet181")


@pytest.mark.parametrize(
    "backbone,img_size", [("resnet18", 64), ("vit_small", 64), ("vit_tiny", 32), ("efficientnet_b0", 48)]
)
def test_models_run_at_the_demo_image_size(backbone, img_size):
    model, card = create_classifier(model_params(backbone=backbone, img_size=img_size), num_classes=6)
    assert model(torch.zeros(2, 3, img_size, img_size)).shape == (2, 6)
    assert len(card.mean) == 3 and card.resolved_backbone == resolve_backbone(backbone)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_checkpoint_loads_backbone_and_drops_a_different_head(tmp_path, suffix):
    donor = timm.create_model("resnet18", pretrained=False, num_classes=10)
    state = donor.state_dict()
    path = tmp_path / f"donor{suffix}"
    save_file(state, path) if suffix == ".safetensors" else torch.save({"state_dict": state}, path)
    model, _ = create_classifier(model_params(backbone="resnet18", checkpoint=str(path)), num_classes=6)
    assert torch.equal(model.state_dict()["conv1.weight"], state["conv1.weight"])
    assert model.state_dict()["fc.weight"].shape == (6, 512)


def test_checkpoint_errors_are_clear(tmp_path):
    with pytest.raises(HemaflowError, match="not found"):
        create_classifier(model_params(checkpoint=str(tmp_path / "none.pth")), 3)
    save_file({"something.else": torch.zeros(3)}, tmp_path / "other.safetensors")
    with pytest.raises(HemaflowError, match="weights of another architecture"):
        create_classifier(model_params(checkpoint=str(tmp_path / "other.safetensors")), 3)


def test_saved_classifier_round_trips(tmp_path):
    model, card = create_classifier(model_params(backbone="resnet18", img_size=32), 3)
    card = card.__class__(**{**card.__dict__, "classes": ["a", "b", "c"]})
    save_classifier(model, card, tmp_path / "fold0")
    loaded, loaded_card = load_classifier(tmp_path / "fold0")
    x = torch.rand(1, 3, 32, 32)
    assert loaded_card.classes == ["a", "b", "c"]
    assert torch.allclose(loaded(x), model.eval()(x))


def test_weighted_probability_average():
    a, b = np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])
    assert np.allclose(average_probabilities([a, b]), [[0.5, 0.5]])
    assert np.allclose(average_probabilities([a, b], [3, 1]), [[0.75, 0.25]])
    with pytest.raises(ValueError, match="one non-negative weight per model"):
        average_probabilities([a, b], [1])
    with pytest.raises(ValueError, match="differ in shape"):
        average_probabilities([a, np.zeros((2, 2))])


def test_epoch_sampler_partitions_ranks_and_balances_classes():
    ranks = [list(EpochSampler(10, seed=1, rank=r, world_size=2)) for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == list(range(10))
    labels = [0] * 90 + [1] * 10
    weights = class_weights(labels, 2)[labels]
    drawn = list(EpochSampler(100, seed=1, weights=weights))
    minority = sum(labels[i] for i in drawn)
    assert 35 <= minority <= 65  # about half, though only 10 % of the cells
    first = EpochSampler(100, seed=1)
    again = EpochSampler(100, seed=1)
    first.set_epoch(3), again.set_epoch(3)
    assert list(first) == list(again)


def test_a_small_labelled_target_slice_takes_its_share_of_the_draws_balanced_among_its_classes():
    # 1,000 class-balanced source cells and a 20-cell slice (15 of class 0, 5 of class 1)
    labels = [0] * 500 + [1] * 500 + [0] * 15 + [1] * 5
    from_slice = np.arange(len(labels)) >= 1000
    weights = with_slice_share(class_weights(labels, 2)[labels], labels, from_slice, 0.25)
    assert float(weights[from_slice].sum() / weights.sum()) == pytest.approx(0.25)
    drawn = np.array(list(EpochSampler(len(labels), seed=3, weights=weights)))
    sliced = drawn[from_slice[drawn]]
    assert 0.2 <= len(sliced) / len(drawn) <= 0.3  # a quarter of the epoch, not 2 % as by its size
    slice_labels = np.array(labels)[sliced]
    assert 0.4 <= slice_labels.mean() <= 0.6  # its rare class drawn as often as its common one
    source_only = with_slice_share(None, labels, from_slice, 0.0)
    assert float(source_only[from_slice].sum()) == 0.0  # share 0: the slice is never drawn


def test_adapted_copies_take_their_share_of_each_source_cells_draws_and_the_slice_is_never_augmented():
    # the same 1,020 cells listed twice, as they are and augmented toward the target
    labels = [0] * 500 + [1] * 500 + [0] * 15 + [1] * 5
    from_slice = np.arange(len(labels)) >= 1000
    weights = with_slice_share(class_weights(labels, 2)[labels], labels, from_slice, 0.25)
    both = with_adapted_copies(weights, from_slice, 0.5)
    as_shown, adapted = both[: len(labels)], both[len(labels) :]
    assert float(both.sum()) == pytest.approx(float(weights.sum()))  # the slice keeps its share of the epoch
    assert float(adapted[from_slice].sum()) == 0.0 and torch.equal(as_shown[from_slice], weights[from_slice])
    torch.testing.assert_close(adapted[~from_slice], as_shown[~from_slice])  # half of each source cell's draws
    drawn = np.array(list(EpochSampler(len(labels), seed=3, weights=both)))
    assert len(drawn) == len(labels)  # an epoch as long as without the copies
    source_draws = drawn[~np.concatenate([from_slice, from_slice])[drawn]]
    assert 0.45 <= (source_draws >= len(labels)).mean() <= 0.55
