"""Resumable training: a state file per run, valid only for the exact params, data and code that wrote it.

A training loop saves its state after every epoch; a rerun loads it only when the fingerprint
(params, seed, input hashes, hemaflow's source) matches, so an interrupted run continues where it
stopped and a run with anything changed starts over: epochs trained by older code are not mixed
into a model that the new code reports. States hold tensors and plain values only and load with
``weights_only=True``: nothing is unpickled. DVC outputs are never used for states (DVC deletes
outputs before a stage runs), so they live in a cache folder named by the stage's ``--state``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import torch

__all__ = ["TrainingState", "file_digest", "fingerprint"]


def fingerprint(*parts: object) -> str:
    """A short, stable hash of JSON-serialisable parts (params dumps, seeds, file digests) and of the
    code that runs them."""
    keyed = [source_digest(), *parts]
    return hashlib.sha256(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:16]


@functools.cache
def source_digest() -> str:
    """A digest of every Python file of the installed hemaflow package."""
    package = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class TrainingState:
    """One resumable state file; ``load`` returns None when there is none or it belongs to another run."""

    def __init__(self, path: Path, key: str):
        self.path, self.key = Path(path), key

    def load(self, map_location: torch.device | str = "cpu") -> dict | None:
        if not self.path.exists():
            return None
        state = torch.load(self.path, map_location=map_location, weights_only=True)
        return state if state.get("fingerprint") == self.key else None

    def save(self, state: dict) -> None:
        """Write atomically: a run killed mid-save keeps the previous epoch's state."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        torch.save({**state, "fingerprint": self.key}, tmp)
        os.replace(tmp, self.path)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
