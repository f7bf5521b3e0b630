"""Pretrained weights: fetched once by ``hemaflow weights get`` (the only command that downloads), kept as data.

``hemaflow weights get NAME`` writes ``models/pretrained/NAME/`` with two files:

- ``weights.safetensors``: tensors only, whatever the published file was (a DINOv2 training
  checkpoint, an mmengine checkpoint, a timm hub file);
- ``card.json``: where it came from (address, licence), the checksums (of the published file and of
  ``weights.safetensors``), and what the weights fit: the timm architecture and its pretrained
  config (input size, mean/std, interpolation) for a classifier, the ``detect.model`` settings for
  a detector.

NAME is an entry of ``weights.yaml`` (DinoBloom S/B/L/G, COCO detectors) or any timm pretrained tag
(``timm.list_pretrained()``), which goes through timm's and huggingface_hub's own download and cache
code and so honours ``HF_HUB_OFFLINE``, ``HF_HOME`` and ``HF_HUB_CACHE``. A published checksum is
verified before anything is written; nothing half-written is ever left in place. Every later use
(``hemaflow.pretrained``) verifies ``weights.safetensors`` against its card, so a teammate's
``dvc pull`` of the folder gives the same start or a one-line error.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import asdict
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from hemaflow._io import write_json, write_tensors
from hemaflow.errors import HemaflowError
from hemaflow.pretrained import CARD, WEIGHTS, PretrainedCard, verified_card
from hemaflow.resume import file_digest

__all__ = ["fetch", "registry"]

REGISTRY = Path(__file__).with_name("weights.yaml")
CHUNK = 1 << 20


def registry(path: Path = REGISTRY) -> dict[str, dict]:
    return yaml.safe_load(path.read_text())


def fetch(name: str, out: Path = Path("models/pretrained"), *, registry_path: Path = REGISTRY) -> Path:
    """Download ``name`` into ``out/name`` (see the module docstring); return the folder."""
    entries = registry(registry_path)
    folder = out / name
    if (folder / CARD).exists():
        verified_card(folder)
        print(f"{folder}: already here (checksum verified)")
        return folder
    if name in entries:
        card, tensors = _from_url(name, entries[name])
    else:
        card, tensors = _from_timm(name)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=_made(out)))
    try:
        write_tensors(staging / WEIGHTS, tensors)
        card = PretrainedCard(**{**asdict(card), "sha256": file_digest(staging / WEIGHTS)})
        write_json(staging / CARD, asdict(card))
        staging.rename(folder)  # the folder appears whole or not at all
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _made(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _from_url(name: str, entry: dict) -> tuple[PretrainedCard, dict[str, torch.Tensor]]:
    with tempfile.TemporaryDirectory() as scratch:
        download = Path(scratch) / Path(entry["url"].split("?")[0]).name
        digest = _download(entry["url"], download)
        expected, prefix = entry.get("sha256"), entry.get("sha256_prefix")
        if (expected and digest != expected) or (prefix and not digest.startswith(prefix)):
            raise HemaflowError(
                f"{entry['url']}: checksum {digest} is not the published {expected or prefix + '...'}; "
                "nothing was kept (a changed or damaged file)"
            )
        tensors = _state_dict(download, entry.get("layout", "state_dict"))
    card = PretrainedCard(
        name=name,
        kind=entry["kind"],
        source=entry["url"],
        licence=entry["licence"],
        sha256="",
        source_sha256=digest,
        timm_model=entry.get("timm_model"),
        pretrained_cfg={
            "input_size": [3, entry["input_size"], entry["input_size"]],
            "mean": entry["mean"],
            "std": entry["std"],
            "interpolation": entry["interpolation"],
            "num_classes": 0,
        }
        if entry["kind"] == "classifier"
        else None,
        detect_model=entry.get("detect_model"),
    )
    return card, tensors


def _download(url: str, path: Path) -> str:
    """Stream ``url`` to ``path`` with a progress bar; its sha256."""
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as response, path.open("wb") as handle:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=path.name) as bar:
                while block := response.read(CHUNK):
                    handle.write(block)
                    digest.update(block)
                    bar.update(len(block))
    except (urllib.error.URLError, OSError) as exc:
        raise HemaflowError(
            f"{url}: cannot download ({getattr(exc, 'reason', exc)}); offline, fetch the file elsewhere and "
            f"run `hemaflow weights get` there, then copy models/pretrained/ here (or `dvc pull` it)"
        ) from None
    return digest.hexdigest()


def _state_dict(path: Path, layout: str) -> dict[str, torch.Tensor]:
    """The tensors of a published checkpoint (loaded with ``weights_only``: no code runs)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling failure means the same thing to the user
        raise HemaflowError(f"{path.name}: not a tensors-only PyTorch checkpoint ({exc})") from None
    if layout == "dinov2_teacher":  # DINOv2 training checkpoints keep the EMA teacher's backbone and heads
        teacher = checkpoint["teacher"]
        return {k.removeprefix("backbone."): v.contiguous() for k, v in teacher.items() if k.startswith("backbone.")}
    state = checkpoint.get("state_dict", checkpoint) if layout == "mmengine" else checkpoint
    return {k: v.contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}


def _from_timm(tag: str) -> tuple[PretrainedCard, dict[str, torch.Tensor]]:
    """A timm pretrained tag through timm's own hub code (and huggingface_hub's cache)."""
    import timm

    if tag not in timm.list_pretrained():
        raise HemaflowError(
            f"{tag}: neither an entry of {REGISTRY.name} ({', '.join(registry())}) nor a timm pretrained tag "
            "(see timm.list_pretrained())"
        )
    try:
        model = timm.create_model(tag, pretrained=True)
    except Exception as exc:  # hub and network errors come in many classes
        raise HemaflowError(
            f"{tag}: cannot fetch timm's weights ({type(exc).__name__}); offline (HF_HUB_OFFLINE=1) the file "
            "must already be in the Hugging Face cache (HF_HUB_CACHE), or run this where the hub is reachable"
        ) from None
    config = model.pretrained_cfg
    card = PretrainedCard(
        name=tag,
        kind="classifier",
        source=f"hf-hub:{config.get('hf_hub_id') or tag}",
        licence=str(config.get("license", "see the model card on the Hugging Face hub")),
        sha256="",
        source_sha256=None,
        timm_model=tag.split(".")[0],
        pretrained_cfg={
            key: config[key]
            for key in ("input_size", "mean", "std", "interpolation", "num_classes", "classifier")
            if key in config
        },
    )
    return card, {k: v.contiguous() for k, v in model.state_dict().items()}
