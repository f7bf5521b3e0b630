"""The classifier: any timm backbone by name, from random init or pretrained weights, never a hub.

Pretrained weights come from a ``hemaflow weights get`` folder (built as its card says, checksum
verified) or a local file. timm's own checkpoint filter of the architecture adapts them (DINOv2 keys,
position embeddings resampled to ``model.img_size``); the head is new for our classes.

A trained fold model is two files: ``<stem>.safetensors`` (tensors only) and ``<stem>.json``
(everything needed to use it again: classes, resolved backbone, input size, normalisation, head).
"""

from __future__ import annotations

import difflib
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file
from torch import nn

from hemaflow._io import write_json, write_tensors
from hemaflow.errors import HemaflowError
from hemaflow.params import ModelParams
from hemaflow.pretrained import load_pretrained, read_card
from hemaflow.resume import file_digest

__all__ = [
    "BACKBONE_ALIASES",
    "KnnClassifier",
    "ModelCard",
    "create_classifier",
    "load_classifier",
    "pretrained_start",
    "resolve_backbone",
    "save_classifier",
]

# Family names a user types -> the one timm variant they mean (documented in the README).
BACKBONE_ALIASES = {
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
    "vit_large": "vit_large_patch16_224",
    "vit_huge": "vit_huge_patch14_224",
    "dinobloom_s": "vit_small_patch14_dinov2",  # DinoBloom (Koch et al. 2024) is DINOv2-based
    "dinobloom_b": "vit_base_patch14_dinov2",
    "dinobloom_l": "vit_large_patch14_dinov2",
    "convnext": "convnext_tiny",
    "efficientnet": "efficientnet_b0",
    "efficientnetv2": "efficientnetv2_s",
    "resnet": "resnet50",
}


def resolve_backbone(name: str) -> str:
    """An exact timm model name, or the variant an alias stands for; close matches if neither."""
    available = timm.list_models()
    if name in available:
        return name
    if name in BACKBONE_ALIASES:
        return BACKBONE_ALIASES[name]
    close = difflib.get_close_matches(name, [*BACKBONE_ALIASES, *available], n=5, cutoff=0.6)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    raise HemaflowError(f"model.backbone: unknown timm model {name!r}{hint} (see timm.list_models())")


@dataclass(frozen=True)
class ModelCard:
    """What a saved classifier needs to be used again (its JSON sidecar)."""

    backbone: str  # as the user wrote it
    resolved_backbone: str
    classes: list[str]
    img_size: int
    mean: list[float]
    std: list[float]
    drop_rate: float = 0.0
    temperature: float = 1.0  # logits are divided by it: fitted on the fold's validation cells (calibration)
    extra: dict | None = None  # training context: fold, metrics, params
    pretrained: dict | None = None  # the starting weights: name, sha256, source (None: random init)
    knn: dict | None = None  # head knn: {"cells": training cells in the bank, "k": neighbours}


# DINO's kNN evaluation (Caron et al. 2021) weighs each neighbour by exp(cosine / 0.07).
KNN_TEMPERATURE = 0.07


class KnnClassifier(nn.Module):
    """A frozen feature extractor whose cells vote by their ``k`` nearest training cells (cosine).

    The bank of normalised training features and their labels are buffers, so the model saves and
    loads like any other; its outputs are log vote shares (softmax gives the shares back).
    """

    def __init__(self, backbone: nn.Module, cells: int, num_classes: int, k: int) -> None:
        super().__init__()
        self.backbone, self.num_classes, self.k = backbone, num_classes, k
        self.register_buffer("bank", torch.zeros(cells, backbone.num_features))
        self.register_buffer("bank_labels", torch.zeros(cells, dtype=torch.long))

    def remember(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.bank.copy_(nn.functional.normalize(features, dim=1))
        self.bank_labels.copy_(labels)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = nn.functional.normalize(self.backbone(images).float(), dim=1)
        similarity, nearest = (features @ self.bank.T).topk(min(self.k, len(self.bank)), dim=1)
        votes = torch.zeros(len(images), self.num_classes, device=images.device)
        votes.scatter_add_(1, self.bank_labels[nearest], (similarity / KNN_TEMPERATURE).exp())
        return torch.log(votes / votes.sum(1, keepdim=True) + 1e-6)


def _build(resolved: str, num_classes: int, img_size: int, drop_rate: float) -> nn.Module:
    options = dict(pretrained=False, num_classes=num_classes, drop_rate=drop_rate)
    try:  # transformers need the input size to size their position embeddings
        return timm.create_model(resolved, img_size=img_size, **options)
    except TypeError as exc:
        if "img_size" not in str(exc):
            raise
        return timm.create_model(resolved, **options)  # convolutional nets take any input size


def pretrained_start(checkpoint: str | None) -> dict | None:
    """Which weights a classifier starts from (name, sha256, source), for its card and metrics; None: random."""
    if not checkpoint:
        return None
    path = Path(checkpoint)
    if path.is_dir():
        card = read_card(path)
        return {"weights": card.name, "sha256": card.sha256, "source": card.source}
    return {"weights": path.name, "sha256": file_digest(path) if path.is_file() else None, "source": str(path)}


def _checkpoint_tensors(path: Path, resolved: str) -> tuple[dict, dict | None]:
    """The tensors of ``model.checkpoint`` and, for a ``weights get`` folder, its pretrained config."""
    if path.is_dir():
        card, state = load_pretrained(path)
        if card.kind != "classifier" or card.timm_model != resolved:
            raise HemaflowError(
                f"model.checkpoint: {path} holds {card.timm_model or card.kind} weights, but model.backbone is "
                f"{resolved}: set model.backbone: {card.timm_model}"
            )
        return state, card.pretrained_cfg
    if not path.is_file():
        raise HemaflowError(f"model.checkpoint: {path} not found (a `hemaflow weights get` folder or a local file)")
    if path.suffix == ".safetensors":
        return load_file(path), None
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "teacher"):  # common wrappers (DINO checkpoints use 'teacher')
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if any(k.startswith("backbone.") for k in state):  # a DINO/DINOv2 training checkpoint's backbone
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    return state, None


def _load_weights(model: nn.Module, resolved: str, path: Path) -> dict | None:
    """Load pretrained weights into ``model`` (a new head); its pretrained config, when the folder's card has one.

    timm's checkpoint filter of the architecture adapts the tensors (DINOv2 keys, position embeddings
    resampled to the model's patch grid); every backbone tensor must then fit, or it is another
    architecture's checkpoint and a one-line error.
    """
    state, config = _checkpoint_tensors(path, resolved)
    adapt = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if adapt is not None:
        try:
            state = adapt(state, model)
        except (KeyError, RuntimeError, ValueError) as exc:
            raise HemaflowError(f"model.checkpoint: {path} does not fit {resolved} ({exc!r})") from None
    own = model.state_dict()
    head = {
        f"{name}.{k}"
        for name, module in model.named_modules()
        if module is model.get_classifier()
        for k in module.state_dict()
    }
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape and k not in head}
    missing = [k for k in own if k not in fitting and k not in head and not k.endswith("num_batches_tracked")]
    if missing:
        raise HemaflowError(
            f"model.checkpoint: {path} lacks {len(missing)} of the {len(own)} tensors of {resolved} "
            f"(e.g. {missing[0]}): weights of another architecture"
        )
    model.load_state_dict(fitting, strict=False)
    return config


def create_classifier(
    params: ModelParams, num_classes: int, head: str = "finetune", knn_k: int = 20
) -> tuple[nn.Module, ModelCard]:
    """A timm model for ``params`` with ``num_classes`` outputs, and its card (normalisation included).

    For ``head="knn"`` the network is the backbone alone (features); :class:`KnnClassifier` wraps it
    once its bank is known. Example::

        model, card = create_classifier(ModelParams(backbone="vit_small", img_size=64), num_classes=6)
    """
    resolved = resolve_backbone(params.backbone)
    model = _build(resolved, num_classes, params.img_size, params.drop_rate)
    pretrained_config = _load_weights(model, resolved, Path(params.checkpoint)) if params.checkpoint else None
    config = pretrained_config or timm.data.resolve_model_data_config(model)
    if head == "knn":
        model.reset_classifier(0)
    card = ModelCard(
        backbone=params.backbone,
        resolved_backbone=resolved,
        classes=[],
        img_size=params.img_size,
        mean=[float(v) for v in config["mean"]],
        std=[float(v) for v in config["std"]],
        drop_rate=params.drop_rate,
        pretrained=pretrained_start(params.checkpoint),
        knn={"cells": 0, "k": knn_k} if head == "knn" else None,
    )
    return model, card


def save_classifier(model: nn.Module, card: ModelCard, stem: Path) -> None:
    """Write ``stem.safetensors`` and ``stem.json`` (each atomically)."""
    write_tensors(stem.with_suffix(".safetensors"), model.state_dict())
    write_json(stem.with_suffix(".json"), asdict(card))


def load_classifier(stem: Path) -> tuple[nn.Module, ModelCard]:
    """A saved classifier in eval mode, built from its card; no network access."""
    sidecar = stem.with_suffix(".json")
    if not sidecar.exists():
        raise HemaflowError(f"{sidecar}: no classifier here (run `dvc repro train_classifier`)")
    card = ModelCard(**json.loads(sidecar.read_text()))
    model = _build(card.resolved_backbone, len(card.classes), card.img_size, card.drop_rate)
    if card.knn is not None:
        model.reset_classifier(0)
        model = KnnClassifier(model, card.knn["cells"], len(card.classes), card.knn["k"])
    model.load_state_dict(load_file(stem.with_suffix(".safetensors")))
    return model.eval(), card
