from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def shared_dataset(name: str) -> Path:
    """A real dataset from ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real dataset {name} not available: {path} is absent (only the project's CI machines have it)")
    return path


TINY_DEMO = {"cells_per_class": 6, "fields_per_domain": 6, "background_fields": 0.2, "target_unlabelled_cells": 8}
