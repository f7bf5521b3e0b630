"""Detector throughput: training images/s, inference ms per 640x480 field (unbatched, batched), a tiled field.

Uses the trained `models/detector` and the prepared demo fields (run `make demo` first) for
inference, and a fresh model of the same config for training steps. Run it on an idle machine:
two processes sharing the 2 cores slow each other down many times over. Usage: `uv run python benchmarks/detect.py [--device cpu|cuda]`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from mmdet.registry import MODELS
from mmdet.structures import DetDataSample
from mmdet.utils import register_all_modules
from mmengine.config import Config
from mmengine.optim import OptimWrapper
from mmengine.structures import InstanceData
from PIL import Image

from hemaflow.detect.detector import CARD, Detector

REPO = Path(__file__).resolve().parents[1]


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up
    tick = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - tick) / repeats


def _training_images_per_second(config: Config, batch: int, side: int, steps: int, device: torch.device) -> float:
    model = MODELS.build(config.model).to(device).train()
    optimizer = OptimWrapper(torch.optim.AdamW(model.parameters(), lr=1e-3))
    samples = []
    for _ in range(batch):
        sample = DetDataSample(
            metainfo={
                "img_shape": (side, side),
                "ori_shape": (side, side),
                "pad_shape": (side, side),
                "scale_factor": (1.0, 1.0),
            }
        )
        sample.gt_instances = InstanceData(bboxes=torch.tensor([[20.0, 24.0, 80.0, 90.0]]), labels=torch.tensor([0]))
        samples.append(sample)
    data = {
        "inputs": [torch.randint(0, 255, (3, side, side), dtype=torch.uint8) for _ in range(batch)],
        "data_samples": samples,
    }
    return batch / _timed(lambda: model.train_step(data, optimizer), steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "detector")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    register_all_modules(init_default_scope=True)
    card = json.loads((args.model / CARD).read_text())
    config, side = Config(card["config"]), card["input_px"]
    batch = config.train_dataloader.batch_size
    device = torch.device(args.device)
    detector = Detector.load(args.model, device=args.device)
    overlap = 0.5
    # Real demo smear fields (at 4 px/um after prepare), mosaicked to the sizes measured.
    images = pd.read_csv(REPO / "data" / "prepared" / "images.csv", keep_default_na=False)
    fields = [
        np.asarray(Image.open(REPO / "data" / "prepared" / f)) for f in images.loc[images["field"] != "", "field"][:16]
    ]
    mosaic = np.concatenate([np.concatenate(fields[r * 4 : r * 4 + 4], axis=1) for r in range(4)], axis=0)
    field = np.asarray(Image.fromarray(mosaic[:480, :640]))  # 640x480 pixels
    small = [np.ascontiguousarray(f[:120, :160]) for f in fields[:8]]  # what a 640x480 field at 16 px/um becomes
    large = np.tile(mosaic, (5, 4, 1))[:2048, :2048]
    rows = [
        (
            "training, images/s",
            _training_images_per_second(config, batch, side, args.repeats, device),
            f"batch {batch}, {side} px",
        ),
        # a 640x480 field at 16 px/um is one network input at the detector's 4 px/um
        (
            "640x480 field at 16 px/um, ms, unbatched",
            1000 * _timed(lambda: detector(field, 16.0, overlap, batch), args.repeats),
            "rescaled to 160x120, one forward",
        ),
        (
            "640x480 field at 16 px/um, ms, batched",
            1000 * _timed(lambda: detector.run_batch(small), args.repeats) / 8,
            "8 per forward, at 4 px/um",
        ),
        (
            "640x480 field at 4 px/um, ms (tiled)",
            1000 * _timed(lambda: detector(field, 4.0, overlap, batch), args.repeats),
            f"{side} px tiles, overlap 0.5",
        ),
        (
            "2048x2048 field at 4 px/um, ms (tiled)",
            1000 * _timed(lambda: detector(large, 4.0, overlap, batch), 1),
            "one run",
        ),
    ]
    print(f"device {device}, arch {config.model.type}, {torch.get_num_threads()} threads\n")
    print("| measurement | value | note |\n|---|---:|---|")
    for name, value, note in rows:
        print(f"| {name} | {value:.1f} | {note} |")


if __name__ == "__main__":
    main()
