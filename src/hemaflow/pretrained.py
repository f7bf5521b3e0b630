"""A folder of pretrained weights (``hemaflow weights get`` writes it): its card, checksum and tensors.

``weights.safetensors`` holds tensors only; ``card.json`` says where they came from and what they
fit. Every use verifies the tensors against the card's sha256, so a teammate's ``dvc pull`` of the
folder gives the same start or a one-line error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from hemaflow.errors import HemaflowError
from hemaflow.resume import file_digest

__all__ = ["CARD", "WEIGHTS", "PretrainedCard", "load_pretrained", "read_card", "verified_card"]

WEIGHTS = "weights.safetensors"
CARD = "card.json"


@dataclass(frozen=True)
class PretrainedCard:
    """What a folder of pretrained weights holds and what it fits (``card.json``)."""

    name: str
    kind: str  # classifier | detector
    source: str  # the address fetched (a URL, or hf-hub:<repo> for a timm tag)
    licence: str
    sha256: str  # of weights.safetensors: verified at every use
    source_sha256: str | None  # of the published file, where one was downloaded
    timm_model: str | None = None  # classifier: the timm architecture (no pretrained tag)
    pretrained_cfg: dict | None = None  # classifier: input_size, mean, std, interpolation, num_classes
    detect_model: dict | None = None  # detector: the detect.model settings the weights fit


def read_card(path: Path) -> PretrainedCard:
    """The card of a ``weights get`` folder (no tensors read)."""
    card_file = path / CARD
    if not card_file.is_file():
        raise HemaflowError(f"{path}: no {CARD} (a folder written by `hemaflow weights get`)")
    return PretrainedCard(**json.loads(card_file.read_text()))


def verified_card(path: Path) -> PretrainedCard:
    """The card of a ``weights get`` folder whose tensors file is the one the card records."""
    card = read_card(path)
    weights = path / WEIGHTS
    if not weights.is_file() or file_digest(weights) != card.sha256:
        raise HemaflowError(f"{weights}: missing or not the file its card records (sha256 {card.sha256})")
    return card


def load_pretrained(path: Path) -> tuple[PretrainedCard, dict[str, torch.Tensor]]:
    """The card and tensors of a ``weights get`` folder, verified against the card's checksum."""
    return verified_card(path), load_file(path / WEIGHTS)
