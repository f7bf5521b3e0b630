from __future__ import annotations

import typing

import numpy as np
import pytest
import torch
from mmdet.registry import MODELS
from mmdet.structures import DetDataSample
from mmdet.utils import register_all_modules
from mmengine.config import Config
from mmengine.structures import InstanceData

from conftest import load
from hemaflow.detect.config import build_config, model_config
from hemaflow.detect.detector import fuse_boxes
from hemaflow.detect.metrics import detection_metrics
from hemaflow.detect.train import reset_stale_work_dir
from hemaflow.metrics import best_giou_matches, cytologia_box_term
from hemaflow.params import DetectorModelParams

ARCHITECTURES = typing.get_args(DetectorModelParams.model_fields["arch"].annotation)
DETECT = load().detect


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_builds_and_trains_with_a_giou_loss(arch):
    register_all_modules(init_default_scope=True)
    config = Config({"model": model_config(DETECT.model.model_copy(update={"arch": arch}))})
    assert "GIoULoss" in config.pretty_text
    model = MODELS.build(config.model)
    sample = DetDataSample(
        metainfo={
            "img_shape": (96, 96),
            "ori_shape": (96, 96),
            "pad_shape": (96, 96),
            "scale_factor": (1.0, 1.0),
            "batch_input_shape": (96, 96),
        }
    )
    sample.gt_instances = InstanceData(bboxes=torch.tensor([[10.0, 12.0, 50.0, 60.0]]), labels=torch.tensor([0]))
    data = model.data_preprocessor(
        {"inputs": [torch.randint(0, 255, (3, 96, 96), dtype=torch.uint8)], "data_samples": [sample]}, True
    )
    losses = model(**data, mode="loss")
    box_losses = [v for k, v in losses.items() if "bbox" in k]
    assert box_losses and all(
        torch.isfinite(torch.as_tensor(v if not isinstance(v, list) else sum(v))) for v in box_losses
    )


def test_whole_config_is_plain_and_single_class(tmp_path):
    config = Config(build_config(params=DETECT, seed=0, prepared=tmp_path, work_dir=tmp_path / "work"))
    assert config.train_dataloader.dataset.metainfo == {"classes": ("wbc",)}
    assert config.train_dataloader.dataset.filter_cfg.filter_empty_gt is False  # background fields train
    assert "RTMDet" in config.pretty_text and config.resume is True


def test_cytologia_box_term_as_the_challenge_defines_it():
    truth = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float)
    assert cytologia_box_term([(truth, truth)]) == 1.0
    assert cytologia_box_term([(truth, np.zeros((0, 4)))]) == 0.0  # a missed box scores 0, not 0.5
    far = np.array([[100, 100, 110, 110]], float)  # GIoU near -1: rescaled near 0
    assert cytologia_box_term([(truth[:1], far)]) < 0.05
    best, giou, _ = best_giou_matches(truth, np.array([[0, 0, 10, 10], [0, 0, 10, 10]], float))  # duplicates removed
    assert list(best) == [0, 0] and giou[0] == 1.0  # row-wise argmax: both true boxes may pick one prediction


def test_perfect_detections_score_perfectly_and_misses_cost_recall():
    truth = {"a": np.array([[0, 0, 10, 10]], float), "b": np.array([[5, 5, 25, 25], [40, 40, 60, 60]], float)}
    predictions = {name: (boxes, np.ones(len(boxes))) for name, boxes in truth.items()}
    perfect = detection_metrics(truth, predictions, 0.5, 200, 0.95, 0)
    assert perfect["AP50"] == pytest.approx(1.0) and perfect["recall_50"] == 1.0 and perfect["mean_giou"] == 1.0
    assert perfect["precision_50"] == 1.0 and perfect["AP50_interval"] == pytest.approx([1.0, 1.0])
    partial = detection_metrics(truth, {"b": predictions["b"]}, 0.5, 200, 0.95, 0)
    assert partial["recall_50"] == pytest.approx(2 / 3) and partial["cytologia_box_term"] == pytest.approx(2 / 3)
    assert (
        partial["precision_50"] == 1.0
        and partial["AP50_interval"][0] < partial["AP50"] < partial["AP50_interval"][1] + 1e-9
    )


def test_work_dir_resumes_only_the_same_config_and_data(tmp_path):
    work = tmp_path / "work"
    assert not reset_stale_work_dir(work, "a")  # new: nothing to reset
    (work / "epoch_3.pth").write_bytes(b"checkpoint")
    assert not reset_stale_work_dir(work, "a") and (work / "epoch_3.pth").exists()  # same run: resume
    assert reset_stale_work_dir(work, "b") and not (work / "epoch_3.pth").exists()  # other params: restart


def test_sync_batchnorm_only_where_it_exists(tmp_path):
    """DDP on CPU (gloo) must keep plain BN; on CUDA every architecture gets SyncBN from the runner."""
    common = {"params": DETECT, "seed": 0, "prepared": tmp_path, "work_dir": tmp_path / "work", "launcher": "pytorch"}
    cpu, cuda = build_config(**common, device="cpu"), build_config(**common, device="cuda")
    assert (
        cpu["model"]["use_syncbn"] is False and "sync_bn" not in cpu and cpu["env_cfg"]["dist_cfg"]["backend"] == "gloo"
    )
    assert cuda["sync_bn"] == "torch" and cuda["env_cfg"]["dist_cfg"]["backend"] == "nccl"


def test_weighted_box_fusion_merges_agreeing_detectors():
    first = (np.array([[10.0, 10, 50, 50]]), np.array([0.9]))
    second = (np.array([[12.0, 10, 52, 50], [200, 200, 240, 240]]), np.array([0.7, 0.8]))
    boxes, scores = fuse_boxes([first, second], [1.0, 1.0], 320, 320, 0.55)
    order = np.argsort(boxes[:, 0])
    boxes, scores = boxes[order], scores[order]
    assert len(boxes) == 2
    assert boxes[0] == pytest.approx([10 + 2 * 0.7 / 1.6, 10, 50 + 2 * 0.7 / 1.6, 50], abs=1e-3)  # score-weighted
    assert scores[0] == pytest.approx(0.8) and scores[1] == pytest.approx(0.4)  # seen by one of two detectors
    assert fuse_boxes([first], [1.0], 320, 320, 0.55) is first
    with pytest.raises(ValueError, match="2 detectors but 1 weights"):
        fuse_boxes([first, second], [1.0], 320, 320, 0.55)


def test_a_checkpoint_pointer_left_empty_by_a_kill_is_dropped_and_a_valid_one_kept(tmp_path):
    from mmengine.runner import find_latest_checkpoint

    from hemaflow.detect.train import reset_stale_work_dir

    work = tmp_path / "work"
    reset_stale_work_dir(work, "key")
    (work / "last_checkpoint").write_text("")  # killed between creating the pointer and writing it
    reset_stale_work_dir(work, "key")
    assert find_latest_checkpoint(str(work)) is None  # starts over instead of loading the folder itself
    (work / "epoch_1.pth").write_bytes(b"saved")
    (work / "last_checkpoint").write_text(str(work / "epoch_1.pth"))
    reset_stale_work_dir(work, "key")
    assert find_latest_checkpoint(str(work)) == str(work / "epoch_1.pth")
