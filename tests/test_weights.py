"""Pretrained starts without the network: `hemaflow weights get` against a loopback server and an offline
Hugging Face cache, the checksum guard, loading into a classifier (DINOv2 keys, position embeddings
resampled), linear probe and kNN heads, and the start recorded in the metrics."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import subprocess
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import hemaflow_command, load, run, train_tiny_classifier
from hemaflow.classify.model import create_classifier, load_classifier
from hemaflow.errors import HemaflowError
from hemaflow.params import ModelParams
from hemaflow.resume import file_digest
from hemaflow.weights import REGISTRY, fetch

pytestmark = pytest.mark.slow


@contextmanager
def loopback_server(folder: Path, seconds: float = 120):
    """Serve ``folder`` on 127.0.0.1 (a free port) until the block ends or ``seconds`` pass."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    deadline = threading.Timer(seconds, server.shutdown)
    deadline.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        deadline.cancel()
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def dinobloom_like(tmp_path_factory):
    """A DINOv2 training checkpoint as DinoBloom publishes it ('teacher', 'backbone.' keys, heads, a mask
    token) at 224 px, made from a random ViT-S/14, and the ViT it came from."""
    folder = tmp_path_factory.mktemp("published")
    vit = timm.create_model("vit_small_patch14_dinov2", img_size=224, num_classes=0)
    teacher = {f"backbone.{k}": v for k, v in vit.state_dict().items()}
    teacher |= {"backbone.mask_token": torch.zeros(1, 384), "dino_head.last_layer.weight": torch.zeros(8, 384)}
    torch.save({"teacher": teacher}, folder / "DinoBloom-S.pth")
    return folder, vit, hashlib.sha256((folder / "DinoBloom-S.pth").read_bytes()).hexdigest()


def _registry(tmp_path: Path, url: str, sha256: str) -> Path:
    entry = yaml.safe_load(REGISTRY.read_text())["dinobloom_s"] | {"url": f"{url}/DinoBloom-S.pth", "sha256": sha256}
    path = tmp_path / "weights.yaml"
    path.write_text(yaml.safe_dump({"dinobloom_s": entry}))
    return path


def test_weights_get_verifies_the_download_and_the_classifier_starts_from_it(dinobloom_like, tmp_path):
    published, vit, sha256 = dinobloom_like
    with loopback_server(published) as url:
        folder = fetch("dinobloom_s", tmp_path / "pretrained", registry_path=_registry(tmp_path, url, sha256))
    card = json.loads((folder / "card.json").read_text())
    assert sorted(p.name for p in folder.iterdir()) == ["card.json", "weights.safetensors"]
    assert card["source_sha256"] == sha256 and card["sha256"] == file_digest(folder / "weights.safetensors")
    assert card["timm_model"] == "vit_small_patch14_dinov2" and card["pretrained_cfg"]["input_size"] == [3, 224, 224]

    params = ModelParams(backbone="dinobloom_s", img_size=56, checkpoint=str(folder), drop_rate=0.0)
    model, model_card = create_classifier(params, num_classes=5)
    assert model.pos_embed.shape == (1, 1 + 4 * 4, 384)  # 16 x 16 patches at 224 px resampled to 4 x 4 at 56 px
    assert torch.equal(model.blocks[5].mlp.fc1.weight, vit.blocks[5].mlp.fc1.weight)
    assert model.get_classifier().out_features == 5
    assert model_card.pretrained == {"weights": "dinobloom_s", "sha256": card["sha256"], "source": card["source"]}

    wrong = ModelParams(backbone="resnet18", img_size=56, checkpoint=str(folder), drop_rate=0.0)
    with pytest.raises(HemaflowError, match="holds vit_small_patch14_dinov2 weights, but model.backbone is resnet18"):
        create_classifier(wrong, num_classes=5)
    weights = folder / "weights.safetensors"
    save_file({k: v + 1 if k == "cls_token" else v for k, v in load_file(weights).items()}, weights)
    with pytest.raises(HemaflowError, match="not the file its card records"):
        create_classifier(params, num_classes=5)


def test_a_wrong_checksum_or_no_server_fails_in_one_line_and_leaves_nothing(dinobloom_like, tmp_path):
    published, _, _ = dinobloom_like
    out = tmp_path / "pretrained"
    with loopback_server(published) as url:
        with pytest.raises(HemaflowError) as error:
            fetch("dinobloom_s", out, registry_path=_registry(tmp_path, url, "0" * 64))
    assert "is not the published" in str(error.value) and "\n" not in str(error.value)
    assert not out.exists() or not any(out.iterdir())
    with pytest.raises(HemaflowError, match="cannot download") as error:
        fetch("dinobloom_s", out, registry_path=_registry(tmp_path, url, "0" * 64))  # the server has stopped
    assert not out.exists() or not any(out.iterdir())


def test_a_timm_tag_comes_from_the_offline_hugging_face_cache(tmp_path):
    reference = timm.create_model("test_resnet.r160_in1k")
    snapshot = tmp_path / "hub" / "models--timm--test_resnet.r160_in1k" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, snapshot / "model.safetensors")
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path)}
    out = tmp_path / "pretrained"

    done = run(hemaflow_command("weights", "get", "test_resnet.r160_in1k", out=out), env=env)
    assert done.returncode == 0, done.stderr
    assert f"dvc add {out / 'test_resnet.r160_in1k'}" in done.stdout
    card = json.loads((out / "test_resnet.r160_in1k" / "card.json").read_text())
    assert card["source"] == "hf-hub:timm/test_resnet.r160_in1k" and card["pretrained_cfg"]["mean"] == [0.5] * 3

    params = ModelParams(
        backbone="test_resnet", img_size=64, checkpoint=str(out / "test_resnet.r160_in1k"), drop_rate=0.0
    )
    model, model_card = create_classifier(params, num_classes=3)
    assert torch.equal(model.conv1[0].weight, reference.conv1[0].weight) and model.fc.out_features == 3
    assert model_card.mean == [0.5, 0.5, 0.5]  # the weights' own normalisation, from their card

    command = hemaflow_command("weights", "get", "test_vit.r160_in1k", out=out)
    missing = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert missing.returncode == 1 and len(missing.stderr.strip().splitlines()) == 1
    assert "HF_HUB_OFFLINE" in missing.stderr and not (out / "test_vit.r160_in1k").exists()


@pytest.mark.parametrize("head", ["linear_probe", "knn", "finetune"])
def test_linear_probe_and_knn_keep_the_pretrained_backbone_and_finetune_moves_it(tiny_models, tmp_path, head):
    start = tiny_models.classifier / "fold0.safetensors"
    p = load(yaml.safe_load(tiny_models.params_file.read_text()))
    metrics = train_tiny_classifier(
        tiny_models,
        tmp_path,
        model_params=p.model.model_copy(update={"checkpoint": str(start)}),
        head=head,
        knn_k=5,
        layer_decay=0.7,
        freeze_epochs=1,
    )
    assert metrics["pretrained"] == {"weights": start.name, "sha256": file_digest(start), "source": str(start)}
    baseline = json.loads((tiny_models.root / "classify.json").read_text())
    assert metrics["oof"]["cells"] == baseline["oof"]["cells"]  # the same held-out cells as training from scratch
    pretrained = load_file(start)
    model, card = load_classifier(tmp_path / "models" / "fold0")
    prefix = "backbone." if head == "knn" else ""
    backbone = {k: v for k, v in model.state_dict().items() if k.startswith(prefix) and not k.startswith("fc.")}
    backbone = {k.removeprefix(prefix): v for k, v in backbone.items()}
    unchanged = [torch.equal(v, pretrained[k]) for k, v in backbone.items() if k in pretrained]
    assert set(backbone) - set(pretrained) <= {"fc.weight", "fc.bias"}
    if head == "finetune":  # a frozen first epoch, then every layer (each at its layer-decayed rate)
        assert p.classify.epochs > 1 and not all(unchanged)
        return
    assert backbone and all(unchanged)
    if head == "knn":
        assert card.knn["k"] == 5 and card.knn["cells"] == len(model.bank) > 0
    else:
        assert not torch.equal(model.fc.weight, pretrained["fc.weight"])  # a new head for our classes


def test_a_detector_weights_folder_must_fit_detect_model_and_loads_verified(tiny_models, tmp_path):
    from hemaflow.detect.train import _pretrained_digest, checkpoint_loader

    p = load(yaml.safe_load(tiny_models.params_file.read_text()))
    folder = tmp_path / "rtmdet_coco"
    folder.mkdir()
    state = load_file(tiny_models.detector / "best.safetensors")
    save_file(state, folder / "weights.safetensors")
    fits = {"arch": p.detect.model.arch, "widen_factor": p.detect.model.widen_factor, "deepen_factor": 1.0}
    card = {"name": "rtmdet_coco", "kind": "detector", "source": "test", "licence": "test", "source_sha256": None}
    card |= {"sha256": file_digest(folder / "weights.safetensors"), "detect_model": fits}
    (folder / "card.json").write_text(json.dumps(card))
    params = p.detect.model_copy(update={"model": p.detect.model.model_copy(update={"checkpoint": str(folder)})})
    with pytest.raises(
        HemaflowError, match=f"detect.model differs \\(deepen_factor: {p.detect.model.deepen_factor}\\)"
    ):
        _pretrained_digest(params)
    loaded = checkpoint_loader(tmp_path / "work")(str(folder), "cpu")["state_dict"]
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


def test_a_detector_starts_from_coco_weights_whose_class_head_differs(tiny_models, tmp_path):
    """As from a published 80-class COCO checkpoint: the head of another shape is left out, the rest loads,
    and training starts from it (mmengine would otherwise *resume* from the file given as load_from)."""
    from hemaflow.detect.train import train_detector

    p = load(yaml.safe_load(tiny_models.params_file.read_text()))
    state = load_file(tiny_models.detector / "best.safetensors")
    coco = {k: torch.randn(80, *v.shape[1:]) if ".rtm_cls." in k else v for k, v in state.items()}
    folder = tmp_path / "coco"
    folder.mkdir()
    save_file(coco, folder / "weights.safetensors")
    model = p.detect.model
    card = {"name": "coco", "kind": "detector", "source": "test", "licence": "test", "source_sha256": None}
    card |= {"sha256": file_digest(folder / "weights.safetensors")}
    card |= {
        "detect_model": {"arch": model.arch, "widen_factor": model.widen_factor, "deepen_factor": model.deepen_factor}
    }
    (folder / "card.json").write_text(json.dumps(card))
    params = p.detect.model_copy(
        update={"epochs": 1, "lr": 1e-12, "model": model.model_copy(update={"checkpoint": str(folder)})}
    )
    train_detector(
        params=params,
        fields_px_per_um=p.prepare.fields.px_per_um,
        seeds=p.base.seeds,
        prepared=tiny_models.prepared,
        work_dir=tmp_path / "work",
        out=tmp_path / "detector",
        plots=tmp_path / "plots",
    )
    trained = load_file(tmp_path / "detector" / "best.safetensors")
    assert trained["bbox_head.rtm_cls.0.weight"].shape[0] == 1  # our one class, a new head
    weights = [k for k in state if k.endswith("conv.weight") and ".rtm_cls." not in k]
    assert all(torch.allclose(trained[k], state[k], atol=1e-6) for k in weights)  # started from the file
