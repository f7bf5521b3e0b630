"""CycleGAN speed: training ms per image (one step = both generators and discriminators), translation images/s.

Measures the demo size from params.yaml and the reference configuration at 256x256 (9 blocks,
ngf 64, batch 1). Run it on an idle machine. Usage: `uv run python benchmarks/translate.py
[--device cpu|cuda] [--steps 5]`.
"""

from __future__ import annotations

import argparse
import itertools
import random
import time

import torch

from hemaflow.params import CycleGanParams, load_params
from hemaflow.runtime import autocast
from hemaflow.translate.cyclegan import ImagePool
from hemaflow.translate.train import CycleGan, _step


def _measure(params: CycleGanParams, device: torch.device, steps: int) -> tuple[float, float]:
    gan = CycleGan(params, 0).to(device)

    def adam(networks):
        return torch.optim.Adam(itertools.chain(*(n.parameters() for n in networks)), params.lr, betas=(0.5, 0.999))

    optimizers = (adam([gan.G_A, gan.G_B]), adam([gan.D_A, gan.D_B]))
    cuda = device.type == "cuda"
    mixed = autocast(device, params.precision)
    scaler = torch.amp.GradScaler(enabled=cuda and params.precision == "fp16")
    pools = (ImagePool(params.pool_size, random.Random(0)), ImagePool(params.pool_size, random.Random(1)))
    shape = (params.batch_size, 3, params.img_size, params.img_size)
    a, b = torch.rand(shape, device=device) * 2 - 1, torch.rand(shape, device=device) * 2 - 1

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    for _ in range(2):
        _step(gan, a, b, pools, params, optimizers, scaler, mixed)
    sync()
    tick = time.perf_counter()
    for _ in range(steps):
        _step(gan, a, b, pools, params, optimizers, scaler, mixed)
    sync()
    train_ms = 1000 * (time.perf_counter() - tick) / (steps * params.batch_size)
    gan.eval()
    with torch.no_grad(), mixed:
        gan.G_A(a)
        sync()
        tick = time.perf_counter()
        for _ in range(steps):
            gan.G_A(a)
        sync()
    return train_ms, steps * params.batch_size / (time.perf_counter() - tick)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    demo = load_params().translate.cyclegan
    reference = demo.model_copy(
        update={
            "img_size": 256,
            "ngf": 64,
            "ndf": 64,
            "n_blocks": 9,
            "upsample": "transpose",
            "batch_size": 1,
            "precision": "fp32",
        }
    )
    configurations = [("demo (params.yaml)", demo), ("reference 256 px, batch 1", reference)]
    if device.type == "cuda":
        configurations.append(
            ("reference 256 px, batch 16, bf16", reference.model_copy(update={"batch_size": 16, "precision": "bf16"}))
        )
    print(f"device {device}, {torch.get_num_threads()} threads\n")
    print("| configuration | train ms/image | translate images/s |\n|---|---:|---:|")
    for name, params in configurations:
        train_ms, images_per_second = _measure(params, device, args.steps)
        size = f"{params.img_size} px, ngf {params.ngf}, {params.n_blocks} blocks, batch {params.batch_size}"
        print(f"| {name}: {size} | {train_ms:.1f} | {images_per_second:.1f} |")


if __name__ == "__main__":
    main()
