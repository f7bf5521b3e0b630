"""Shared test data: params built from the repository's params.yaml, a tiny demo, and the tiny models
trained once per session and shared by every test that needs a trained detector or classifier.

Tiers: `make test-fast` runs the tests not marked `slow` (no training beyond seconds); `make test`
runs everything. Real-data tests read ../shared/data and skip with the reason when it is absent.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml

import hemaflow  # first: pins the CPU kernels before torch is imported (hemaflow/__init__.py)

# pytest-xdist runs one worker per core: each worker's math, and every command it starts (TINY's
# base.cpu_threads), on one thread, so that the workers do not fight over the cores. The count also
# orders parallel sums, so models trained in a test and in a command compare bit for bit.
TEST_THREADS = 1
hemaflow.pin_threads(TEST_THREADS)

if TYPE_CHECKING:
    from hemaflow.params import ModelParams, Recipe


@pytest.fixture(autouse=True)
def _test_threads():
    """Every test starts and ends on TEST_THREADS (an in-process CLI call pins params.yaml's count)."""
    hemaflow.pin_threads(TEST_THREADS)
    yield
    hemaflow.pin_threads(TEST_THREADS)


REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
TINY_DEMO = {
    "cells_per_class": 6,
    "fields_per_domain": 6,
    "background_fields": 0.2,
    "target_unlabelled_cells": 8,
    "target_test_cells": 12,
}


def shared_dataset(name: str) -> Path:
    """A real dataset from ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real dataset {name} not available: {path} is absent (only the project's CI machines have it)")
    return path


def merged(base: dict, overlay: dict) -> dict:
    """``base`` with ``overlay`` merged in, section by section (lists and values replaced)."""
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        out[key] = merged(out.get(key, {}), value) if isinstance(value, dict) else copy.deepcopy(value)
    return out


def recipe(translate: str = "none", augment=(), adabn=False, self_training=None, few_shot=False) -> dict:
    """One adaptation method as params.yaml spells it (adapt.methods.NAME)."""
    return {
        "translate": translate,
        "augment": list(augment),
        "adabn": adabn,
        "self_training": self_training,
        "few_shot": few_shot,
    }


def params_data(overlay: dict | None = None) -> dict:
    """The repository's params.yaml as a dict, with ``overlay`` merged in.

    When the overlay's datasets hold no target domain, the adaptation methods that need one go too
    (only ``none`` is left), as a user without target data would set them.
    """
    data = merged(yaml.safe_load((REPO / "params.yaml").read_text()), overlay or {})
    if not any(d["role"] == "target" for d in data["prepare"]["datasets"]):
        data["translate"]["methods"] = ["none"]
        data["translate"]["cyclegan"]["train"] = False
        data["adapt"] = {"methods": {"none": recipe()}, "deploy": "none"}
    return data


def load(overlay: dict | None = None):
    """Typed params: the repository's params.yaml with ``overlay`` merged in."""
    from hemaflow.params import parse_params

    return parse_params(params_data(overlay))


def write_params(path: Path, overlay: dict | None = None) -> Path:
    path.write_text(yaml.safe_dump(params_data(overlay), sort_keys=False))
    return path


TINY = {
    "base": {"cpu_threads": TEST_THREADS},
    "demo_data": TINY_DEMO,
    "prepare": {"folds": 2, "workers": 0},
    "model": {"img_size": 32},
    "classify": {"folds": 1, "epochs": 2, "batch_size": 16},
    # ~9 training fields: 30 short epochs (about a minute) are what it takes to propose real boxes
    "detect": {"epochs": 30, "batch_size": 4},
    "translate": {
        "cyclegan": {
            "train": True,  # the translator tests train it; the demo params leave it off
            "img_size": 32,
            "ngf": 8,
            "ndf": 8,
            "n_blocks": 1,
            "epochs": 1,
            "epochs_decay": 1,
            "batch_size": 4,
        }
    },
}


def run(command: list[str], timeout: float = 900, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def hemaflow_command(*args: str | Path, **options: object) -> list[str]:
    """``python -m hemaflow ARGS --option value ...`` (``work_dir=`` becomes ``--work-dir``; True: a flag)."""
    flags = []
    for key, value in options.items():
        flags += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return [sys.executable, "-m", "hemaflow", *map(str, args), *flags]


def detector_params(path: Path, base: Path, seeds: list[int] | None = None, **detect: object) -> Path:
    """``base`` params with ``detect`` keys (and ``base.seeds``) overridden, written to ``path``."""
    data = yaml.safe_load(base.read_text())
    data["detect"].update(detect)
    if seeds is not None:
        data["base"]["seeds"] = seeds
    path.write_text(yaml.safe_dump(data))
    return path


def train_detector_command(params: Path, prepared: Path, root: Path) -> list[str]:
    """``hemaflow train-detector`` writing its work dir, model and plots under ``root``."""
    return hemaflow_command(
        "train-detector",
        params=params,
        prepared=prepared,
        work_dir=root / "work",
        out=root / "model",
        plots=root / "plots",
    )


def built_once(tmp_path_factory, worker_id: str, name: str, build: Callable[[Path], None]) -> Path:
    """``build(folder)`` once per test run, shared by the pytest-xdist workers (the first builds, the others wait)."""
    hemaflow.pin_threads(TEST_THREADS)  # session fixtures are set up before the autouse one
    if worker_id == "master":  # no xdist: this process is the whole run
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp().parent  # the run's folder, above every worker's own
    folder = root / name
    with FileLock(str(root / f"{name}.lock")):
        if not (folder / ".built").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            (folder / ".built").touch()
    return folder


def _build_tiny_prepared(root: Path) -> None:
    from hemaflow.data.demo import demo_data
    from hemaflow.data.prepare import prepare
    from hemaflow.params import load_params

    params_file = write_params(root / "params.yaml", merged(TINY, {"prepare": {"root": str(root / "demo")}}))
    params = load_params(params_file)
    demo_data(params=params.demo_data, seed=3, out=root / "demo")
    prepare(
        params=params.prepare,
        seed=params.base.seed,
        out=root / "prepared",
        metrics=root / "data.json",
        plots=root / "plots",
    )


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory, worker_id):
    """A tiny demo run through prepare: (prepared folder, params.yaml written for it), built once."""
    root = built_once(tmp_path_factory, worker_id, "tiny", _build_tiny_prepared)
    return root / "prepared", root / "params.yaml"


@dataclass(frozen=True)
class TinyModels:
    """Everything the tiny pipeline trained, once per session."""

    root: Path
    prepared: Path
    params_file: Path
    detector: Path
    detections: Path
    crops: Path
    cells: Path  # the `none` translation of the crops: what the classifier trained on
    classifier: Path


def _build_tiny_models(prepared: Path, params_file: Path, root: Path) -> None:
    from hemaflow.classify.train import train_classifier
    from hemaflow.data.crop import crop
    from hemaflow.detect.detect import detect
    from hemaflow.detect.train import train_detector
    from hemaflow.params import Translation, load_params
    from hemaflow.translate.translate import translate

    p = load_params(params_file)
    train_detector(
        params=p.detect,
        fields_px_per_um=p.prepare.fields.px_per_um,
        seeds=p.base.seeds,
        prepared=prepared,
        work_dir=root / "detector_work",
        out=root / "detector",
        plots=root / "detect_plots",
    )
    detect(
        params=p.detect,
        predict=p.predict,
        evaluation=p.evaluate,
        seed=p.base.seed,
        prepared=prepared,
        model=root / "detector",
        out=root / "detections",
        metrics=root / "detect.json",
    )
    crop(
        params=p.crop,
        geometry=p.prepare.crop,
        max_pixels=p.prepare.max_pixels,
        prepared=prepared,
        detections=root / "detections",
        out=root / "crops",
        metrics=root / "crop.json",
    )
    translate(
        method=Translation.none,
        reference_cells=8,
        seed=0,
        crops=root / "crops",
        prepared=prepared,
        translator=None,
        out=root / "none",
        metrics=root / "none.json",
        plots=root / "none_plots",
    )
    train_classifier(
        model_params=p.model,
        params=p.classify,
        recipe=p.adapt.methods["none"],
        seeds=p.base.seeds,
        cells=root / "none",
        crops=root / "crops",
        prepared=prepared,
        out=root / "classifier",
        metrics=root / "classify.json",
        plots=root / "classify_plots",
        state=root / "state",
    )


@pytest.fixture(scope="session")
def tiny_models(tiny_prepared, tmp_path_factory, worker_id) -> TinyModels:
    """A tiny detector, its detections, training crops and a tiny classifier (in-process, about 45 s), built once."""
    prepared, params_file = tiny_prepared
    root = built_once(
        tmp_path_factory, worker_id, "models", lambda folder: _build_tiny_models(prepared, params_file, folder)
    )
    return TinyModels(
        root,
        prepared,
        params_file,
        root / "detector",
        root / "detections",
        root / "crops",
        root / "none",
        root / "classifier",
    )


def train_tiny_classifier(
    tiny_models: TinyModels,
    folder: Path,
    *,
    prepared: Path | None = None,
    cells: Path | None = None,
    recipe: Recipe | None = None,
    seeds: list[int] | None = None,
    model_params: ModelParams | None = None,
    **classify: object,
) -> dict:
    """Train the tiny classifier's folds into ``folder``/models (metrics.json, plots and state beside it);
    its metrics. Unset arguments are the tiny pipeline's; ``classify`` keys update its classify params."""
    from hemaflow.classify.train import train_classifier

    p = load(yaml.safe_load(tiny_models.params_file.read_text()))
    train_classifier(
        model_params=model_params or p.model,
        params=p.classify.model_copy(update=classify),
        recipe=recipe or p.adapt.methods["none"],
        seeds=seeds or p.base.seeds,
        cells=cells or tiny_models.cells,
        crops=tiny_models.crops,
        prepared=prepared or tiny_models.prepared,
        out=folder / "models",
        metrics=folder / "metrics.json",
        plots=folder / "plots",
        state=folder / "state",
    )
    return json.loads((folder / "metrics.json").read_text())


def kill_when(command: list[str], ready: Callable[[], bool], timeout: float = 600) -> None:
    """Start ``command`` and SIGKILL it as soon as ``ready()`` holds (an interrupted training)."""
    with tempfile.TemporaryFile("w+") as stderr:  # a file, not a pipe: progress bars would fill a pipe and block
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
        deadline = time.time() + timeout
        while time.time() < deadline and process.poll() is None and not ready():
            time.sleep(0.002)  # a tiny run's last epoch lasts a fraction of a second: poll often, and cheaply
        if process.poll() is not None:
            stderr.seek(0)
            pytest.fail(f"{command[3]} ended (exit {process.returncode}) before it was killed: {stderr.read()[-2000:]}")
        process.kill()
        process.wait()


# The longest test files first: pytest-xdist hands out files in collection order, and a long file
# started last keeps one worker busy while the other waits (the run lasts as long as its busiest worker).
LONGEST_FIRST = ("test_pipeline.py", "test_profiles.py", "test_translate.py", "test_detect_train.py")


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file keeps its own order
