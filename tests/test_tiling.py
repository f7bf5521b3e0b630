"""Large fields are detected tile by tile as well as small ones are whole: no box piles up on an edge."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from hemaflow.detect.detector import Detector, tile_origins
from hemaflow.metrics import pairwise_iou


def test_tiles_cover_the_image_with_the_overlap():
    assert tile_origins(100, 160, 0.5) == [0]
    starts = tile_origins(640, 160, 0.5)
    assert starts[0] == 0 and starts[-1] == 480 and all(b - a <= 80 for a, b in zip(starts, starts[1:], strict=False))


class _EdgeHappyNetwork:
    """Stands in for a detector's forward pass: finds the dark square cells of a tile, and also puts a
    confident box on every tile's left edge (what a network does with the cut it sees there)."""

    def __call__(self, images):
        out = []
        for image in images:
            dark = image.mean(2) < 60
            boxes, scores = [[0.0, 40.0, 12.0, 70.0]], [0.9]  # the spurious one
            ys, xs = np.nonzero(dark)
            if len(xs):
                boxes.append([xs.min(), ys.min(), xs.max() + 1.0, ys.max() + 1.0])
                scores.append(0.8)
            out.append((np.array(boxes, float), np.array(scores)))
        return out


def test_spurious_tile_edge_boxes_never_reach_the_output(monkeypatch):
    detector = Detector(model=None, pipeline=None, input_px=160, px_per_um=4.0, score_threshold=0.5, device=None)
    monkeypatch.setattr(detector, "run_batch", _EdgeHappyNetwork())
    field = np.full((400, 700, 3), 220, np.uint8)
    field[100:130, 300:330] = 20  # one cell, far from every edge
    boxes, scores = detector(field, 4.0, 0.5, 8)
    assert len(boxes) == 1 and boxes[0] == pytest.approx([300, 100, 330, 130], abs=1.0)
    cut = field.copy()
    cut[200:230, :20] = 20  # a cell cut by the image's left border is still found, once
    boxes, _ = detector(cut, 4.0, 0.5, 8)
    assert len(boxes) == 2 and any(b == pytest.approx([0, 200, 20, 230], abs=1.0) for b in boxes)


def _on_border(boxes: np.ndarray, shape: tuple[int, ...]) -> int:
    """How many (x1, y1, x2, y2) boxes touch the border of an image of ``shape``."""
    height, width = shape[:2]
    return int(((boxes[:, 0] < 1) | (boxes[:, 1] < 1) | (boxes[:, 2] > width - 1) | (boxes[:, 3] > height - 1)).sum())


@pytest.mark.slow
def test_a_mosaic_finds_the_cells_its_fields_hold_and_none_on_its_edges(tiny_models):
    detector = Detector.load(tiny_models.detector, "cpu")
    fields = sorted((tiny_models.prepared.parent / "demo" / "acevedo_fields" / "images").glob("*.jpg"))[:4]
    images = [np.asarray(Image.open(f).convert("RGB")) for f in fields]
    height, width = images[0].shape[:2]
    mosaic = np.concatenate([np.concatenate(images[:2], axis=1), np.concatenate(images[2:4], axis=1)], axis=0)
    # The tiny detector's scores are low, and below about 0.07 it also gives field-sized junk boxes
    # that come and go with any change of its weights: compare the boxes above that.
    threshold = 0.1
    alone = []
    for k, image in enumerate(images):
        boxes, scores = detector(image, 10.0, 0.5, 8)
        row, column = divmod(k, 2)
        alone.append(boxes[scores >= threshold] + [column * width, row * height] * 2)
    alone = np.concatenate(alone)
    boxes, scores = detector(mosaic, 10.0, 0.5, 8)  # 800x600 at 10 px/um: 320x240 at 4 px/um, tiled
    tiled = boxes[scores >= threshold]
    assert len(alone) > 0
    # a cell cut by the mosaic's border is cut by its own field's border too: judge both on all four
    assert _on_border(tiled, mosaic.shape) <= _on_border(alone, mosaic.shape) + 1
    found = pairwise_iou(alone, tiled).max(1) >= 0.5
    assert found.mean() >= 0.8 and abs(len(tiled) - len(alone)) <= max(2, 0.25 * len(alone))
