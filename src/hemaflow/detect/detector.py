"""A trained detector on any image: rescale to its training pixel size, tile large fields, fuse boxes.

Large fields are never shrunk to the network input (cells would fall below the size the
detector learned): they are cut into overlapping tiles of the training input size, a box cut by
an inner tile edge is dropped (another tile sees that cell whole), and the rest are merged with
weighted box fusion (ensemble-boxes), which also merges the boxes of several detectors.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from ensemble_boxes import weighted_boxes_fusion
from mmcv.transforms import Compose
from mmdet.registry import MODELS
from mmdet.utils import register_all_modules
from mmengine.config import Config
from safetensors.torch import load_file
from torch import nn

from hemaflow.data.scale import rescale
from hemaflow.errors import HemaflowError
from hemaflow.params import DetectParams
from hemaflow.runtime import select_device

# mmdet 3.3 calls the deprecated torch.cuda.amp.autocast in every forward pass, even on the CPU:
# the warning is mmdet's to fix and says nothing to our users.
warnings.filterwarnings("ignore", message=r"`torch\.cuda\.amp\.autocast", category=FutureWarning)

__all__ = ["CARD", "Detector", "DetectorEnsemble", "NoDetector", "fuse_boxes", "score_threshold", "tile_origins"]

CARD = "detector.json"  # the model card beside best.safetensors
PAD_VALUE = 114  # what mmdet's Pad fills with in training and inference: the network knows it as background
EDGE_PX = 2.0  # a box this close to a tile edge touches it


class NoDetector(HemaflowError):
    """The pipeline trained no detector because the data holds no smear fields."""


def tile_origins(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets covering ``length`` with tiles of ``tile`` overlapping by ``overlap`` (fraction)."""
    if length <= tile:
        return [0]
    stride = max(int(tile * (1 - overlap)), 1)
    starts = list(range(0, length - tile, stride))
    return [*starts, length - tile]


def fuse_boxes(
    predictions: Sequence[tuple[np.ndarray, np.ndarray]],
    weights: Sequence[float],
    width: int,
    height: int,
    iou_threshold: float,
    conf_type: str = "avg",
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted box fusion of several (boxes, scores) sets on one image, boxes in its pixels.

    With ``avg`` (between detectors) a cell only some detectors find keeps a score lowered in
    proportion, so the score threshold then acts as a soft vote; ``max`` (between tiles of one
    detector) keeps the best view of a cell.
    """
    if len(predictions) != len(weights):
        raise ValueError(f"{len(predictions)} detectors but {len(weights)} weights")
    if len(predictions) == 1 and conf_type == "avg":
        return predictions[0]
    scale = np.array([width, height, width, height], dtype=np.float64)
    boxes, scores, _ = weighted_boxes_fusion(
        [np.clip(np.asarray(b, dtype=np.float64).reshape(-1, 4) / scale, 0, 1).tolist() for b, _ in predictions],
        [np.asarray(s, dtype=np.float64).tolist() for _, s in predictions],
        [[0] * len(s) for _, s in predictions],
        weights=list(weights),
        iou_thr=iou_threshold,
        skip_box_thr=0.0,
        conf_type=conf_type,
    )
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * scale, np.asarray(scores, dtype=np.float64)


@dataclass
class Detector:
    """A trained detector, ready for images at any pixel size."""

    model: nn.Module
    pipeline: Compose
    input_px: int
    px_per_um: float  # the pixel size it was trained at
    score_threshold: float  # chosen on validation fields (detect.score_threshold: auto) or given
    device: torch.device
    seed: int | None = None  # the training seed (base.seeds); None for a detector from elsewhere

    @classmethod
    def load(cls, model_dir: Path, device: str = "auto") -> Detector:
        card_path = model_dir / CARD
        if not card_path.exists():
            raise HemaflowError(f"{model_dir}: no trained detector (run `dvc repro train_detector`)")
        card = json.loads(card_path.read_text())
        if card.get("status") == "none":
            raise NoDetector(f"{model_dir}: no detector was trained ({card['reason']})")
        register_all_modules(init_default_scope=True)
        model = MODELS.build(Config(card["config"]).model)
        model.load_state_dict(load_file(model_dir / "best.safetensors"))
        target = select_device(device, "detect.device")
        steps = [
            {"type": "mmdet.LoadImageFromNDArray"},
            {"type": "Resize", "scale": (card["input_px"], card["input_px"]), "keep_ratio": True},
            {"type": "Pad", "size": (card["input_px"], card["input_px"]), "pad_val": {"img": (PAD_VALUE,) * 3}},
            {"type": "PackDetInputs", "meta_keys": ("img_id", "ori_shape", "img_shape", "scale_factor")},
        ]
        threshold = card.get("score_threshold", 0.0)
        return cls(
            model.to(target).eval(),
            Compose(steps),
            card["input_px"],
            card["px_per_um"],
            threshold,
            target,
            card.get("seed"),
        )

    @torch.no_grad()
    def run_batch(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Boxes and scores for RGB images already at the training pixel size, one forward pass."""
        packed = [
            self.pipeline({"img": np.ascontiguousarray(image[..., ::-1]), "img_id": i})
            for i, image in enumerate(images)
        ]
        data = {"inputs": [p["inputs"] for p in packed], "data_samples": [p["data_samples"] for p in packed]}
        results = self.model.test_step(data)
        return [(r.pred_instances.bboxes.cpu().numpy(), r.pred_instances.scores.cpu().numpy()) for r in results]

    def _tiled(self, scaled: np.ndarray, overlap: float, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Boxes of an image larger than one network input, in its pixels.

        The image is laid on a canvas padded on every side with the training pad value, by half the
        tile overlap, and the canvas is tiled. So every tile edge, the image's own edges included,
        has a neighbouring tile that sees past it, and a box touching any tile edge is a partial
        view (or the network's answer to the cut itself) that is dropped: each cell is whole in some
        tile, a cell cut by the image border included. Dropping edge boxes only at inner tile edges
        kept every spurious box the network puts at a tile's edge in the first row and column, piled
        up along the image's left and top borders.
        """
        side, margin = self.input_px, max(round(self.input_px * overlap / 2), 2)
        canvas = np.pad(scaled, ((margin, margin), (margin, margin), (0, 0)), constant_values=PAD_VALUE)
        height, width = canvas.shape[:2]
        tiles = [(x, y) for y in tile_origins(height, side, overlap) for x in tile_origins(width, side, overlap)]
        crops = [canvas[y : y + side, x : x + side] for x, y in tiles]
        found = []
        for start in range(0, len(crops), batch_size):
            found += self.run_batch(crops[start : start + batch_size])
        boxes, scores = [], []
        for (tile_boxes, tile_scores), (x, y) in zip(found, tiles, strict=True):
            inside = (tile_boxes[:, :2] > EDGE_PX).all(1) & (tile_boxes[:, 2:] < side - EDGE_PX).all(1)
            boxes.append(tile_boxes[inside] + np.array([x, y, x, y]) - margin)
            scores.append(tile_scores[inside])
        all_boxes, all_scores = np.concatenate(boxes), np.concatenate(scores)
        all_boxes = np.clip(all_boxes, 0, [scaled.shape[1], scaled.shape[0]] * 2)
        # One list, not one "model" per tile: WBF would divide each score by the tile count.
        return fuse_boxes([(all_boxes, all_scores)], [1.0], scaled.shape[1], scaled.shape[0], 0.55, conf_type="max")

    def __call__(
        self, image: np.ndarray, px_per_um: float, overlap: float, batch_size: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Boxes (x1, y1, x2, y2 in ``image`` pixels, inside it, at least 1 px wide and high) and scores
        for one RGB image of any size, every score (threshold with ``score_threshold``)."""
        factor = self.px_per_um / px_per_um
        scaled = rescale(image, factor)
        if max(scaled.shape[:2]) <= self.input_px:  # one network input, padded right and bottom as in training
            boxes, scores = self.run_batch([scaled])[0]
        else:
            boxes, scores = self._tiled(scaled, overlap, batch_size)
        boxes = np.clip(np.asarray(boxes, dtype=np.float64).reshape(-1, 4) / factor, 0, [*image.shape[1::-1]] * 2)
        # a box under one pixel is no cell, and rounding in the CSVs would turn it into an empty one
        real = (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)
        return boxes[real], np.asarray(scores, dtype=np.float64)[real]


@dataclass
class DetectorEnsemble:
    """The pipeline's detector plus ``predict.extra_detectors``, their boxes fused by weighted box fusion."""

    detectors: list[Detector]
    weights: list[float]
    wbf_iou: float
    overlap: float
    batch_size: int

    @classmethod
    def load(
        cls, members: Sequence[tuple[Path, float]], wbf_iou: float, overlap: float, batch_size: int, device: str
    ) -> DetectorEnsemble:
        return cls(
            [Detector.load(path, device) for path, _ in members], [w for _, w in members], wbf_iou, overlap, batch_size
        )

    @property
    def score_threshold(self) -> float:
        """The first (the pipeline's own) detector's threshold."""
        return self.detectors[0].score_threshold

    def __call__(self, rgb: np.ndarray, px_per_um: float) -> tuple[np.ndarray, np.ndarray]:
        """Every fused box and score on one image (not thresholded)."""
        found = [detector(rgb, px_per_um, self.overlap, self.batch_size) for detector in self.detectors]
        return fuse_boxes(found, self.weights, rgb.shape[1], rgb.shape[0], self.wbf_iou)


def score_threshold(params: DetectParams, ensemble: DetectorEnsemble) -> float:
    """``detect.score_threshold``, or with ``auto`` the one chosen on the validation fields (model card)."""
    return ensemble.score_threshold if params.score_threshold == "auto" else params.score_threshold
