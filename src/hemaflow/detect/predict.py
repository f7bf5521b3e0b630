"""Detection on any image: rescale to the training pixel size, tile large fields, fuse the boxes.

Large fields are never shrunk to the network input (cells would fall below the size the
detector learned): they are cut into overlapping tiles of the training input size, and the
tiles' boxes are merged with weighted box fusion (ensemble-boxes).
"""

from __future__ import annotations

import json
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

__all__ = ["Detector", "tile_origins"]


def tile_origins(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets covering ``length`` with tiles of ``tile`` overlapping by ``overlap`` (fraction)."""
    if length <= tile:
        return [0]
    stride = max(int(tile * (1 - overlap)), 1)
    starts = list(range(0, length - tile, stride))
    return [*starts, length - tile]


@dataclass
class Detector:
    """A trained detector, ready for images at any pixel size."""

    model: nn.Module
    pipeline: Compose
    input_px: int
    px_per_um: float  # the pixel size it was trained at
    device: torch.device

    @classmethod
    def load(cls, model_dir: Path, px_per_um: float, device: str = "auto") -> Detector:
        sidecar = model_dir / "best.json"
        if not sidecar.exists():
            raise HemaflowError(f"{model_dir}: no trained detector (run `dvc repro train_detector`)")
        register_all_modules(init_default_scope=True)
        card = json.loads(sidecar.read_text())
        config, input_px = Config(card["config"]), card["input_px"]
        model = MODELS.build(config.model)
        model.load_state_dict(load_file(model_dir / "best.safetensors"))
        use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        target = torch.device("cuda" if use_cuda else "cpu")
        steps = [
            {"type": "mmdet.LoadImageFromNDArray"},
            {"type": "Resize", "scale": (input_px, input_px), "keep_ratio": True},
            {"type": "Pad", "size": (input_px, input_px), "pad_val": {"img": (114, 114, 114)}},
            {"type": "PackDetInputs", "meta_keys": ("img_id", "ori_shape", "img_shape", "scale_factor")},
        ]
        return cls(model.to(target).eval(), Compose(steps), input_px, px_per_um, target)

    @torch.no_grad()
    def run_batch(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Boxes and scores for RGB images already at the training pixel size, one forward pass."""
        packed = [self.pipeline({"img": np.ascontiguousarray(image[..., ::-1]), "img_id": i}) for i, image in enumerate(images)]
        data = {"inputs": [p["inputs"] for p in packed], "data_samples": [p["data_samples"] for p in packed]}
        results = self.model.test_step(data)
        return [(r.pred_instances.bboxes.cpu().numpy(), r.pred_instances.scores.cpu().numpy()) for r in results]

    def _whole(self, boxes: np.ndarray, x: int, y: int, width: int, height: int, margin: float = 2.0) -> np.ndarray:
        """Which boxes of the tile at (x, y) do not touch an edge shared with another tile.

        Tiles overlap by more than a cell, so every cell lies whole inside some tile: a box cut by
        an inner tile edge is a partial view of a cell that another tile sees whole.
        """
        side = self.input_px
        cut_left = (boxes[:, 0] <= margin) & (x > 0)
        cut_top = (boxes[:, 1] <= margin) & (y > 0)
        cut_right = (boxes[:, 2] >= side - margin) & (x + side < width)
        cut_bottom = (boxes[:, 3] >= side - margin) & (y + side < height)
        return ~(cut_left | cut_top | cut_right | cut_bottom)

    def __call__(
        self, image: np.ndarray, px_per_um: float, overlap: float = 0.25, batch_size: int = 8
    ) -> tuple[np.ndarray, np.ndarray]:
        """Boxes (x1, y1, x2, y2 in ``image`` pixels, inside it, at least 1 px wide and high) and scores
        for one RGB image of any size."""
        factor = self.px_per_um / px_per_um
        scaled = rescale(image, factor)
        height, width = scaled.shape[:2]
        tiles = [(x, y) for y in tile_origins(height, self.input_px, overlap) for x in tile_origins(width, self.input_px, overlap)]
        crops = [scaled[y : y + self.input_px, x : x + self.input_px] for x, y in tiles]
        found = []
        for start in range(0, len(crops), batch_size):
            found += self.run_batch(crops[start : start + batch_size])
        if len(tiles) == 1:
            boxes, scores = found[0]
        else:
            normaliser = np.array([width, height, width, height], dtype=np.float64)
            whole = [self._whole(b, x, y, width, height) for (b, _), (x, y) in zip(found, tiles, strict=True)]
            shifted = np.concatenate([b[k] + np.array([x, y, x, y]) for (b, _), k, (x, y) in zip(found, whole, tiles, strict=True)])
            all_scores = np.concatenate([s[k] for (_, s), k in zip(found, whole, strict=True)])
            # One list, not one "model" per tile: WBF would divide each score by the tile count.
            boxes, scores, _ = weighted_boxes_fusion(
                [np.clip(shifted / normaliser, 0, 1).tolist()],
                [all_scores.tolist()],
                [[0] * len(all_scores)],
                iou_thr=0.55,
                skip_box_thr=0.001,
                conf_type="max",
            )
            boxes = np.asarray(boxes).reshape(-1, 4) * normaliser
            scores = np.asarray(scores)
        boxes = np.clip(np.asarray(boxes, dtype=np.float64).reshape(-1, 4) / factor, 0, [*image.shape[1::-1]] * 2)
        # a box under one pixel is no cell, and rounding in the CSVs would turn it into an empty one
        real = (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)
        return boxes[real], np.asarray(scores, dtype=np.float64)[real]
