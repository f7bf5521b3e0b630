"""`hemaflow predict` speed: milliseconds per 640x480 smear image, end to end (detect, crop, classify).

Uses the trained `models/detector` and `models/classifier/<adapt.deploy>` (with auto, the method `compare` chose) (run `make demo`
first) on 640x480 images cut from the demo's target-domain fields. Run it on an idle machine.
The device is `classify.device` / `detect.device` from params.yaml.
Usage: `uv run python benchmarks/predict.py [--images 16]`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hemaflow.classify.adapt import deployed_method
from hemaflow.params import load_params
from hemaflow.predict import CellPipeline

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    args = parser.parse_args()
    params = load_params(REPO / "params.yaml")
    method = deployed_method(params.adapt.deploy, REPO / "metrics" / "cross_domain.json")
    pipeline = CellPipeline.load(params, REPO / "models" / "detector", REPO / "models" / "classifier" / method)
    fields = sorted((REPO / "data" / "demo" / "wbc1_fields").glob("*.jpg"))
    mosaic = np.concatenate([np.asarray(Image.open(f).convert("RGB")) for f in fields[:8]], axis=1)
    height = mosaic.shape[0]
    tiled = np.concatenate([mosaic] * (-(-480 // height)), axis=0)
    images = [
        np.ascontiguousarray(tiled[:480, (i * 37) % (tiled.shape[1] - 640) :][:, :640]) for i in range(args.images)
    ]
    ppu = 11.52  # the demo's WBC1-like domain
    pipeline(images[0], ppu)  # warm-up
    cells, tick = 0, time.perf_counter()
    for image in images:
        cells += len(pipeline(image, ppu).classes)
    seconds = time.perf_counter() - tick
    print(
        f"device {pipeline.device.type}, {torch.get_num_threads()} threads, classifier {method} "
        f"({len(pipeline.classifiers[0])} fold models, TTA {params.classify.tta})\n"
    )
    print("| measurement | value |\n|---|---:|")
    print(f"| 640x480 image at {ppu} px/um, ms per image (end to end) | {1000 * seconds / len(images):.1f} |")
    print(f"| cells per image | {cells / len(images):.2f} |")
    print(f"| images timed | {len(images)} |")


if __name__ == "__main__":
    main()
