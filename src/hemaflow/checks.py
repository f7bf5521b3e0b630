"""Names in params checked before anything runs: a typo costs seconds, not a pipeline.

``hemaflow params check`` runs every check; ``prepare`` (the first stage of a real run) runs
them too, and each later stage checks the names it uses at its start. The checks only fail
early: they change no output, so stages do not depend on this module.
"""

from __future__ import annotations

from pathlib import Path

from hemaflow.errors import HemaflowError
from hemaflow.params import Params, ParamsError

__all__ = ["check_backbone", "check_datasets", "check_detector", "check_params"]


def check_backbone(params: Params) -> list[str]:
    """``model.backbone`` resolves to a timm model; ``model.checkpoint`` exists when given."""
    from hemaflow.classify.model import resolve_backbone

    problems = []
    try:
        resolve_backbone(params.model.backbone)
    except HemaflowError as exc:
        problems.append(str(exc))
    if params.model.checkpoint and not Path(params.model.checkpoint).exists():
        problems.append(f"model.checkpoint: {params.model.checkpoint} not found")
    return problems


def check_detector(params: Params) -> list[str]:
    """The architecture ``detect.model.arch`` builds is in MMDetection's registry; its checkpoint exists when given."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    from hemaflow.detect.config import model_config

    register_all_modules(init_default_scope=False)
    problems = []
    kind = model_config(params.detect.model)["type"]
    if MODELS.get(kind) is None:
        problems.append(
            f"detect.model.arch: {params.detect.model.arch} builds {kind}, which MMDetection's registry lacks"
        )
    if params.detect.model.checkpoint and not Path(params.detect.model.checkpoint).exists():
        problems.append(f"detect.model.checkpoint: {params.detect.model.checkpoint} not found")
    for k, member in enumerate(params.predict.extra_detectors):
        if not Path(member.path).is_dir():
            problems.append(f"predict.extra_detectors.{k}.path: {member.path} is not a folder")
    return problems


def check_datasets(params: Params) -> list[str]:
    """Every dataset folder exists under ``prepare.root``."""
    root = Path(params.prepare.root)
    return [
        f"prepare.datasets.{k}.path: {root / d.path} not found (dataset {d.name!r})"
        for k, d in enumerate(params.prepare.datasets)
        if not (root / d.path).is_dir()
    ]


def check_params(
    params: Params, source: str, *, backbone: bool = True, detector: bool = True, datasets: bool = True
) -> None:
    """Raise one ParamsError listing every problem found by the checks asked for."""
    problems = (check_backbone(params) if backbone else []) + (check_detector(params) if detector else [])
    problems += check_datasets(params) if datasets else []
    if problems:
        raise ParamsError(f"{source}: " + "; ".join(problems))
