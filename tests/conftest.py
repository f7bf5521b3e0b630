from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
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


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory):
    """A tiny demo run through prepare: (prepared folder, params.yaml written for it)."""
    import yaml

    from hemaflow.data.demo import generate_demo
    from hemaflow.data.prepare import prepare
    from hemaflow.params import DemoDataParams, load_params

    root = tmp_path_factory.mktemp("tiny")
    generate_demo(DemoDataParams(**TINY_DEMO), 3, root / "demo")
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["prepare"].update(root=str(root / "demo"), folds=2)
    data["model"].update(img_size=32)
    data["classify"].update(folds=1, epochs=2, batch_size=16)
    (root / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    params = load_params(root / "params.yaml")
    prepare(params.prepare, params.base.seed, root / "prepared", root / "data.json", root / "plots")
    return root / "prepared", root / "params.yaml"


def kill_when(command: list[str], ready: Callable[[], bool], timeout: float = 600) -> None:
    """Start ``command`` and SIGKILL it as soon as ``ready()`` holds (an interrupted training)."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None and not ready():
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be interrupted"
