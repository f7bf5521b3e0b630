"""Unsupervised adaptation around a trained classifier: AdaBN, confident pseudo-labels, scores of
a model on the unlabelled target (estimated accuracy, information), the training of a labelled
target slice (domain-specific batch norm, domain heads), and the choice of a method from such scores.

Pure functions of arrays and models (``train_classifier`` and ``compare`` call them), and the
reading of the choice for ``hemaflow predict``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
from scipy.stats import entropy
from torch import nn
from torch.utils.data import DataLoader

from hemaflow.errors import HemaflowError

__all__ = [
    "DomainHeads",
    "adapt_batch_norm",
    "average_thresholded_confidence",
    "choose_method",
    "confident_pseudo_labels",
    "deployed_method",
    "domain_heads_loss",
    "forward_per_domain",
    "information_maximization",
]


def _batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def adapt_batch_norm(model: nn.Module, loader: DataLoader, device: torch.device) -> int:
    """AdaBN (Li et al. 2018): replace every batch-norm layer's running mean and variance by those of
    the images in ``loader`` (the unlabelled target cells); weights stay as trained. Returns the number
    of layers adapted (0: the model has no batch norm, and is unchanged)."""
    layers = _batch_norms(model)
    if not layers:
        return 0
    model.eval()  # dropout and the rest stay in inference mode
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # a cumulative average over every batch, not an exponential one
        layer.train()
    for images, _ in loader:
        model(images.to(device))
    for layer, momentum in zip(layers, momenta, strict=True):
        layer.momentum = momentum
    model.eval()
    return len(layers)


@contextmanager
def _running_statistics_kept(model: nn.Module) -> Iterator[None]:
    """Batch norm in training mode normalises by the batch's own statistics and leaves its running ones as they are."""
    layers = _batch_norms(model)
    tracking = [layer.track_running_stats for layer in layers]
    for layer in layers:
        layer.track_running_stats = False  # torch and timm then pass no running buffers to batch_norm
    try:
        yield
    finally:
        for layer, tracks in zip(layers, tracking, strict=True):
            layer.track_running_stats = tracks


def forward_per_domain(model: nn.Module, images: torch.Tensor, from_target: torch.Tensor) -> torch.Tensor:
    """Outputs for a training batch that mixes source cells and labelled target cells (``from_target``,
    bool per row), in the batch's order, with each domain normalised by its own batch statistics and
    only the source cells moving the running statistics (domain-specific batch norm, Chang et al.
    2019). A shared batch norm normalises the target slice by source-dominated statistics in training
    while AdaBN normalises the target by its own when deployed; and the running statistics that
    score the source would carry the slice's colours."""
    out = None
    for is_target in (False, True):
        rows = from_target == is_target
        if not rows.any():
            continue
        with _running_statistics_kept(model) if is_target else nullcontext():
            part = model(images[rows])
        if out is None:
            out = part.new_empty((len(images), *part.shape[1:]))
        out[rows] = part
    return out


class DomainHeads(nn.Module):
    """A timm classifier with a second classifier head that learns the source cells alone, as the source
    lab shows them, for training on source cells with a labelled target slice or with augmentations
    toward the target. The classifier's own head learns everything and is the one deployed on the
    target; the source head scores the source and serves it (``source_model``). With one shared head
    the slice's labels pull held-out source cells toward the slice's classes (README: few-shot's
    source cost). ``forward`` gives both heads' logits side by side (N x 2 classes), so that
    DistributedDataParallel and ``forward_per_domain`` see one network with one output."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.source_head = copy.deepcopy(model.get_classifier())  # the same start as the own head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.model.forward_head(self.model.forward_features(images), pre_logits=True)
        return torch.cat([self.model.get_classifier()(features), self.source_head(features)], 1)

    def source_model(self) -> nn.Module:
        """A copy of the classifier with the source head in place of its own."""
        model = copy.deepcopy(self.model)
        model.get_classifier().load_state_dict(self.source_head.state_dict())
        return model


def domain_heads_loss(
    outputs: torch.Tensor, labels: torch.Tensor, not_source: torch.Tensor, criterion: nn.Module
) -> torch.Tensor:
    """``DomainHeads``' training loss: the own head's on every cell plus the source head's on the
    cells as the source shows them (``not_source``: bool per row, true for slice cells and for
    cells augmented toward the target)."""
    own, source = outputs.chunk(2, 1)
    loss = criterion(own, labels)
    if (~not_source).any():
        loss = loss + criterion(source[~not_source], labels[~not_source])
    return loss


def confident_pseudo_labels(
    probabilities: np.ndarray, classes: Sequence[str], threshold: float
) -> tuple[np.ndarray, list[str]]:
    """(row indices, classes) of the cells whose highest probability is at or above ``threshold``."""
    confidence = probabilities.max(1) if len(probabilities) else np.zeros(0)
    rows = np.flatnonzero(confidence >= threshold)
    return rows, [classes[i] for i in probabilities[rows].argmax(1)]


def average_thresholded_confidence(
    source_confidence: np.ndarray, source_correct: np.ndarray, target_confidence: np.ndarray
) -> float:
    """Estimated target accuracy, ATC (Garg et al. 2022): the confidence threshold above which the
    share of out-of-fold source cells equals their accuracy, then the share of target cells above it."""
    # at 100 % source accuracy the threshold is the least confident source cell, not minus infinity:
    # target cells less sure than every source cell still count as errors
    threshold = float(np.quantile(source_confidence, 1 - float(np.mean(source_correct))))
    return float(np.mean(target_confidence > threshold))


def information_maximization(probabilities: np.ndarray, groups: Sequence[str]) -> float:
    """Mutual information (nats) between a target cell and its predicted group (IM: Liang et al. 2020's
    SHOT objective, a validator in Musgrave et al. 2022): the entropy of the mean prediction minus the
    mean entropy of each prediction, after summing the class probabilities (N x classes) into
    ``groups`` (one per class). High when predictions are both confident and spread over the groups;
    a classifier that calls most target cells one thing, sure of itself, scores near 0, where ATC
    scores it high."""
    names, group_of = np.unique(np.asarray(groups), return_inverse=True)
    summed = probabilities @ np.eye(len(names))[group_of]  # N x groups
    return float(entropy(summed.mean(0)) - entropy(summed, axis=1).mean())


def costing_the_source(source_costs: dict[str, dict], tolerance: float) -> list[str]:
    """The methods that cost the labelled source more than ``tolerance`` of out-of-fold macro-F1,
    established: the paired 95 % interval of their difference to none (``source_costs``, as
    ``against_baseline`` gives it) lies wholly below -tolerance."""
    return [m for m, cost in source_costs.items() if cost["interval"][1] < -tolerance]


def choose_method(selection: dict[str, dict], harms_source: Collection[str] = ()) -> tuple[str, str]:
    """The adaptation method to deploy, from each method's ``selection`` scores (train_classifier's
    metrics: no test label is among them) -> (method, why).

    With a labelled target slice, the best out-of-fold macro-F1 on it over coarse groups (the five
    main types where the target holds only those): the target's own labels, however few, beat any
    proxy. Without one, the highest information (``information_maximization`` over coarse groups) of
    the target predictions, among the methods not in ``harms_source`` (``costing_the_source``: an
    out-of-fold source cost beyond adapt.source_tolerance, established). A method that changes what
    the labelled cells are (a translation that paints one class into another) makes the classifier
    confident on the target whether or not it is right, and IM rewards confidence (README: the 128 px
    CycleGAN run).
    Not ATC, which is also recorded: on the real benchmarks it kept picking none where adabn was the
    test's best (README's record), because an unadapted classifier can be most confident where it
    is most wrong (BCCD: 55 of 71 cells called immature granulocytes, ATC 0.6678, accuracy 0).
    Ties go to the method listed first in adapt.methods."""
    methods = list(selection)
    if any(s["target_labelled_coarse_macro_f1"] is not None for s in selection.values()):
        best = max(methods, key=lambda m: -1.0 if (v := selection[m]["target_labelled_coarse_macro_f1"]) is None else v)
        score = selection[best]["target_labelled_coarse_macro_f1"]
        cells = selection[best]["target_labelled_cells"]
        return best, f"best coarse macro-F1 on the labelled target slice ({score:.4f}, {cells} cells, out of fold)"
    trusted = [m for m in methods if m not in harms_source] or methods
    if any(selection[m]["target_information"] is not None for m in trusted):
        best = max(trusted, key=lambda m: -1.0 if (v := selection[m]["target_information"]) is None else v)
        left_out = [m for m in methods if m not in trusted]
        return best, (
            "most informative target predictions without target labels "
            f"(IM {selection[best]['target_information']:.4f} nats)"
            + (f"; left out for costing the source out of fold: {', '.join(left_out)}" if left_out else "")
        )
    return methods[0], "no target cells to choose by: the first method"


def deployed_method(deploy: str, cross_domain: Path = Path("metrics/cross_domain.json")) -> str:
    """``adapt.deploy``, or where it is ``auto`` the method the ``compare`` stage chose."""
    if deploy != "auto":
        return deploy
    if not cross_domain.exists():
        raise HemaflowError(f"{cross_domain}: missing; adapt.deploy is auto, so run `dvc repro compare` to choose")
    return json.loads(cross_domain.read_text())["deployed_method"]
