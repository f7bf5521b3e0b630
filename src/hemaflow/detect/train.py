"""The ``train_detector`` stage: mmengine's Runner on the prepared COCO splits.

The work directory persists between runs, so an interrupted training resumes from its last
epoch checkpoint (mmengine ``resume=True``). mmengine 0.10.7 loads checkpoints with a bare
``torch.load``, which torch >= 2.6 refuses for its pickled extras (mmengine#1655): we register
our own loader (see :func:`checkpoint_loader`). The best epoch's weights are exported as
``best.safetensors`` (tensors only) + ``detector.json`` (the model card: config, pixel size,
input size and the score threshold chosen on the validation fields).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from mmengine.config import Config
from mmengine.model import MMDistributedDataParallel
from mmengine.registry import MODEL_WRAPPERS
from mmengine.runner import CheckpointLoader, Runner, find_latest_checkpoint
from safetensors.torch import load_file

from hemaflow._io import atomic_dir, write_csv, write_json, write_tensors
from hemaflow.data.images import MAX_FIELD_PIXELS, load_rgb
from hemaflow.detect.config import build_config
from hemaflow.detect.detector import CARD, Detector
from hemaflow.detect.metrics import choose_threshold
from hemaflow.errors import HemaflowError
from hemaflow.params import DetectParams
from hemaflow.pretrained import load_pretrained, read_card
from hemaflow.resume import file_digest, fingerprint
from hemaflow.runtime import seed_folder, select_device
from hemaflow.tables import field_boxes, read_cells, read_images

__all__ = ["checkpoint_loader", "last_checkpoint", "reset_stale_work_dir", "train_detector"]

CURVE_COLUMNS = ["epoch", "train_loss", "val_mAP", "val_mAP_50"]


@MODEL_WRAPPERS.register_module(name="DeviceAwareDDP", force=True)
class DeviceAwareDDP(MMDistributedDataParallel):
    """mmengine's DDP wrapper that also runs on CPU (gloo).

    mmengine 0.10.7 always passes ``device_ids=[LOCAL_RANK]``, which torch's DDP rejects for a
    module on the CPU; a CPU module gets ``device_ids=None`` instead.
    """

    def __init__(self, module: torch.nn.Module, device_ids: list[int] | None = None, **kwargs):
        on_cpu = next(module.parameters()).device.type == "cpu"
        super().__init__(module=module, device_ids=None if on_cpu else device_ids, **kwargs)


def _init_cpu_process_group() -> None:
    """Under torchrun on CPU, start the gloo group here: mmengine's own init calls torch.cuda.set_device."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="gloo")


def checkpoint_loader(trusted_dir: Path):
    """An mmengine checkpoint loader that unpickles only checkpoints our own runner wrote.

    A resume checkpoint in ``trusted_dir`` (the stage's work directory, written by this process's
    Runner) carries mmengine's message hub: numpy arrays whose pickles need ``getattr``, which no
    allow-list can admit safely. Those files are ours, so they load in full; any other file (a
    user's ``detect.model.checkpoint``) loads with ``weights_only=True``.
    """
    trusted = trusted_dir.resolve()

    def load(filename: str, map_location: str | None = None) -> dict:
        path = Path(filename).resolve()
        if path.is_dir():  # a `hemaflow weights get` folder: tensors only, checksum verified
            return {"state_dict": load_pretrained(path)[1]}
        if path.suffix == ".safetensors":
            return {"state_dict": load_file(path)}
        own = path.parent == trusted and path.suffix == ".pth"
        return torch.load(path, map_location=map_location, weights_only=not own)

    return load


def _pretrained_digest(params: DetectParams) -> str | None:
    """The sha256 of ``detect.model.checkpoint`` (part of the resume key); a ``weights get`` folder must fit."""
    if not params.model.checkpoint:
        return None
    path = Path(params.model.checkpoint)
    if not path.is_dir():
        return file_digest(path)
    card = read_card(path)
    wrong = {k: v for k, v in (card.detect_model or {}).items() if getattr(params.model, k) != v}
    if card.kind != "detector" or wrong:
        raise HemaflowError(
            f"detect.model.checkpoint: {path} holds weights for {card.detect_model or card.timm_model}; "
            f"detect.model differs ({', '.join(f'{k}: {getattr(params.model, k)}' for k in wrong) or card.kind})"
        )
    return card.sha256


def _register_loader(work_dir: Path) -> None:
    CheckpointLoader.register_scheme(prefixes="", loader=checkpoint_loader(work_dir), force=True)


def _check_ops(device: str) -> None:
    """A CPU-built mmcv has no CUDA kernels: say so before mmcv fails deep in NMS."""
    if device != "cuda":
        return
    from mmcv.ops import nms

    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]], device="cuda")
    try:
        nms(boxes, torch.ones(1, device="cuda"), 0.5)
    except RuntimeError as exc:
        raise HemaflowError(
            "mmcv was built without CUDA ops, so detection cannot run on the GPU; reinstall it with "
            "FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=<your GPU, e.g. 9.0> (see README, GPU set-up), "
            f"or set detect.device: cpu ({exc})"
        ) from None


def _curves(work_dir: Path) -> pd.DataFrame:
    """Per-epoch training loss and validation mAP from every run's scalars.json (resumes included)."""
    rows: dict[int, dict] = {}
    for scalars in sorted(work_dir.glob("*/vis_data/scalars.json")):
        for line in scalars.read_text().splitlines():
            record = json.loads(line)
            # training records carry "epoch"; validation records only "step", which is the epoch
            epoch = int(record["epoch"] if "epoch" in record else record.get("step", 0))
            entry = rows.setdefault(epoch, {"epoch": epoch})
            if "loss" in record:
                entry.setdefault("losses", []).append(record["loss"])
            for key in ("coco/bbox_mAP", "coco/bbox_mAP_50"):
                if key in record:
                    entry[key.split("/")[1]] = record[key]
    table = [
        {
            "epoch": e,
            "train_loss": float(np.mean(r["losses"])) if "losses" in r else None,
            "val_mAP": r.get("bbox_mAP"),
            "val_mAP_50": r.get("bbox_mAP_50"),
        }
        for e, r in sorted(rows.items())
        if e > 0
    ]
    return pd.DataFrame(table, columns=CURVE_COLUMNS)


def _best_checkpoint(work_dir: Path) -> Path:
    best = sorted(work_dir.glob("best_coco_bbox_mAP_epoch_*.pth"))
    if best:
        return best[-1]
    last = last_checkpoint(work_dir)
    if last is None:
        raise HemaflowError(f"{work_dir}: training wrote no checkpoint")
    return last


def last_checkpoint(work_dir: Path) -> Path | None:
    """The checkpoint mmengine's ``last_checkpoint`` pointer names, if the pointer is whole.

    mmengine writes the pointer in place once a checkpoint is saved, so a kill between opening and
    writing it leaves it empty: that names no checkpoint, and resuming from it would start over.
    """
    pointer = work_dir / "last_checkpoint"
    named = pointer.read_text().strip() if pointer.exists() else ""
    return Path(named) if named and Path(named).is_file() else None


def reset_stale_work_dir(work_dir: Path, key: str) -> bool:
    """Empty ``work_dir`` unless its checkpoints come from the same config and data; True if emptied.

    The work dir persists so that an interrupted training resumes, but a run with other params or
    other data must start over, not "resume" a finished run of the old ones.
    """
    marker = work_dir / "fingerprint.txt"
    stale = work_dir.exists() and (not marker.exists() or marker.read_text() != key)
    if stale:
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(key)
    if last_checkpoint(work_dir) is None:  # an empty pointer: start over, not "resume" the work dir itself
        (work_dir / "last_checkpoint").unlink(missing_ok=True)
    return stale


def validation_threshold(out: Path, prepared: Path, params: DetectParams, batch_size: int) -> dict:
    """The score threshold that maximises F1 at IoU 0.5 on the validation fields, run as `detect` runs them."""
    images, cells = read_images(prepared), read_cells(prepared)
    fields = images[(images["split"] == "val") & (images["field"] != "")]
    detector = Detector.load(out, params.device)
    predictions = {}
    for field in fields.itertuples():
        rgb = load_rgb(Path(field.image), MAX_FIELD_PIXELS)[0]
        predictions[field.image] = detector(rgb, field.px_per_um, params.tile_overlap, batch_size)
    return choose_threshold(field_boxes(fields, cells), predictions)


def train_detector(
    *,
    params: DetectParams,
    fields_px_per_um: float,
    seeds: list[int],
    prepared: Path,
    work_dir: Path,
    out: Path,
    plots: Path,
) -> None:
    """Train (or resume) one detector per seed; export each best epoch with a model card that records
    the score threshold chosen on the validation fields. The first seed's detector (``out``) is the
    pipeline's, the others (``out/seeds/seed<s>``) measure the spread across seeds. Without smear
    fields in the data, the card says so."""
    annotations = json.loads((prepared / "coco" / "train.json").read_text())["annotations"]
    if not annotations:
        work_dir.mkdir(parents=True, exist_ok=True)  # a declared output, empty: nothing to resume
        write_json(out / CARD, {"status": "none", "reason": "no smear fields with boxes in the training data"})
        write_csv(plots / "curves.csv", pd.DataFrame(columns=CURVE_COLUMNS))
        return
    device = select_device(params.device, "detect.device").type
    _check_ops(device)
    if device == "cpu":
        _init_cpu_process_group()
    for stale in work_dir.glob("*"):  # seeds no longer asked for
        if stale.name not in {f"seed{seed}" for seed in seeds}:
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    best = {seed: _fit(params, seed, prepared, work_dir / f"seed{seed}", device) for seed in seeds}
    if int(os.environ.get("RANK", "0")) != 0:
        return
    with atomic_dir(out) as staging:
        for seed, (config, checkpoint) in best.items():
            folder = seed_folder(staging, seed, seeds)
            # RTMDet shares its head convs across levels; safetensors stores each name separately
            write_tensors(folder / "best.safetensors", {k: v.clone() for k, v in checkpoint["state_dict"].items()})
            card = {
                "status": "trained",
                "config": config,
                "input_px": params.input_px,
                "px_per_um": fields_px_per_um,
                "seed": seed,
                "epoch": checkpoint["meta"].get("epoch"),
            }
            write_json(folder / CARD, card)
            write_json(folder / CARD, card | validation_threshold(folder, prepared, params, params.batch_size))
    write_csv(plots / "curves.csv", _curves(work_dir / f"seed{seeds[0]}"))


def _fit(params: DetectParams, seed: int, prepared: Path, work_dir: Path, device: str) -> tuple[dict, dict]:
    """Train one seed's detector in ``work_dir`` (resuming it where it stopped): its config and best checkpoint."""
    _register_loader(work_dir)
    launcher = "pytorch" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "none"
    config = build_config(
        params=params, seed=seed, prepared=prepared, work_dir=work_dir, launcher=launcher, device=device
    )
    data = [file_digest(prepared / "coco" / f"{split}.json") for split in ("train", "val")]
    key = fingerprint({k: v for k, v in config.items() if k != "launcher"}, data, _pretrained_digest(params))
    if int(os.environ.get("RANK", "0")) == 0 and reset_stale_work_dir(work_dir, key):
        print(f"{work_dir}: params or data changed since its checkpoints; training from the start")
    if dist.is_initialized():
        dist.barrier()  # the other ranks must not read the work dir while rank 0 empties it
    runner_config = Config(config)
    if find_latest_checkpoint(str(work_dir)) is not None:
        runner_config.load_from = None  # resume our own last epoch (mmengine would resume *from* load_from)
    elif runner_config.load_from:
        runner_config.resume = False  # start from the pretrained weights; a head of another shape is left out
    # mmengine keeps one visualizer per name per process: a second seed's runner would log into the first's folder
    runner_config.visualizer["name"] = f"visualizer_{work_dir.resolve()}_{time.monotonic_ns()}"
    Runner.from_cfg(runner_config).train()
    checkpoint = checkpoint_loader(work_dir)(str(_best_checkpoint(work_dir)), "cpu")
    return config, checkpoint
