"""The classifier: any timm backbone by name, random init or a local checkpoint, never a hub.

A trained fold model is two files: ``<stem>.safetensors`` (tensors only) and ``<stem>.json``
(everything needed to use it again: classes, resolved backbone, input size, normalisation).
"""

from __future__ import annotations

import difflib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file
from torch import nn

from hemaflow._io import write_json, write_tensors
from hemaflow.errors import HemaflowError
from hemaflow.params import ModelParams

__all__ = [
    "BACKBONE_ALIASES",
    "ModelCard",
    "create_classifier",
    "load_classifier",
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


def _build(resolved: str, num_classes: int, img_size: int, drop_rate: float) -> nn.Module:
    options = dict(pretrained=False, num_classes=num_classes, drop_rate=drop_rate)
    try:  # transformers need the input size to size their position embeddings
        return timm.create_model(resolved, img_size=img_size, **options)
    except TypeError as exc:
        if "img_size" not in str(exc):
            raise
        return timm.create_model(resolved, **options)  # convolutional nets take any input size


def _load_weights(model: nn.Module, path: Path) -> None:
    """Load local pretrained weights, dropping tensors whose shape differs (a different head)."""
    if not path.is_file():
        raise HemaflowError(f"model.checkpoint: {path} not found (a local .safetensors or .pth file)")
    if path.suffix == ".safetensors":
        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model", "teacher"):  # common wrappers (DINO checkpoints use 'teacher')
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
    own = model.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not fitting:
        raise HemaflowError(f"model.checkpoint: no tensor of {path} fits {type(model).__name__}: wrong backbone?")
    model.load_state_dict(fitting, strict=False)


def create_classifier(params: ModelParams, num_classes: int) -> tuple[nn.Module, ModelCard]:
    """A timm model for ``params`` with ``num_classes`` outputs, and its card (normalisation included).

    Example::

        model, card = create_classifier(ModelParams(backbone="vit_small", img_size=64), num_classes=6)
    """
    resolved = resolve_backbone(params.backbone)
    model = _build(resolved, num_classes, params.img_size, params.drop_rate)
    if params.checkpoint:
        _load_weights(model, Path(params.checkpoint))
    config = timm.data.resolve_model_data_config(model)
    card = ModelCard(
        backbone=params.backbone,
        resolved_backbone=resolved,
        classes=[],
        img_size=params.img_size,
        mean=[float(v) for v in config["mean"]],
        std=[float(v) for v in config["std"]],
        drop_rate=params.drop_rate,
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
    model.load_state_dict(load_file(stem.with_suffix(".safetensors")))
    return model.eval(), card
