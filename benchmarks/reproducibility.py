"""What reproducible CPU kernels cost: training steps per second with hemaflow's pinned AVX2 kernels
against the machine's widest ("native"), measured in one run, alternating, for the classifier, the
detector and the translator at the demo's sizes.

Each measurement runs in its own process (the kernels are chosen when torch loads). Usage:
`uv run python benchmarks/reproducibility.py [--repeats 3] [--steps 12]`. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

MODELS = (
    "classifier resnet18, 64 px, batch 32",
    "detector RTMDet-tiny, 160 px, batch 8",
    "CycleGAN demo size, batch 8",
)


def _worker(model: str, steps: int) -> float:
    """Seconds per training step of one model (run inside the measured process)."""
    import torch

    import hemaflow  # noqa: F401  pins (or not) the kernels before torch loads
    from hemaflow.params import load_params

    torch.set_num_threads(2)
    params = load_params("params.yaml")
    if model.startswith("classifier"):
        from hemaflow.classify.model import create_classifier

        network, _ = create_classifier(params.model, 6)
        optimizer = torch.optim.AdamW(network.parameters(), 1e-3)
        images, labels = torch.rand(32, 3, 64, 64), torch.randint(0, 6, (32,))

        def step():
            loss = torch.nn.functional.cross_entropy(network(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    elif model.startswith("detector"):
        from mmdet.registry import MODELS as REGISTRY
        from mmdet.structures import DetDataSample
        from mmdet.utils import register_all_modules
        from mmengine.optim import OptimWrapper
        from mmengine.structures import InstanceData

        from hemaflow.detect.config import model_config

        register_all_modules(init_default_scope=True)
        network = REGISTRY.build(model_config(params.detect.model)).train()
        wrapper = OptimWrapper(torch.optim.AdamW(network.parameters(), lr=1e-3))
        samples = []
        for _ in range(8):
            sample = DetDataSample(
                metainfo={
                    "img_shape": (160, 160),
                    "ori_shape": (160, 160),
                    "pad_shape": (160, 160),
                    "scale_factor": (1.0, 1.0),
                }
            )
            sample.gt_instances = InstanceData(
                bboxes=torch.tensor([[20.0, 24.0, 80.0, 90.0]]), labels=torch.tensor([0])
            )
            samples.append(sample)
        generator = torch.Generator().manual_seed(0)
        data = {
            "inputs": [torch.randint(0, 255, (3, 160, 160), dtype=torch.uint8, generator=generator) for _ in range(8)],
            "data_samples": samples,
        }

        def step():
            network.train_step(data, wrapper)

    else:
        import itertools
        import random

        from hemaflow.runtime import autocast
        from hemaflow.translate.cyclegan import ImagePool
        from hemaflow.translate.train import CycleGan, _step

        gan_params = params.translate.cyclegan
        gan = CycleGan(gan_params, 0)
        optimizers = tuple(
            torch.optim.Adam(itertools.chain(*(n.parameters() for n in nets)), 2e-4, betas=(0.5, 0.999))
            for nets in ((gan.G_A, gan.G_B), (gan.D_A, gan.D_B))
        )
        pools = (ImagePool(50, random.Random(0)), ImagePool(50, random.Random(1)))
        shape = (gan_params.batch_size, 3, gan_params.img_size, gan_params.img_size)
        a, b = torch.rand(shape) * 2 - 1, torch.rand(shape) * 2 - 1
        scaler = torch.amp.GradScaler(enabled=False)

        def step():
            _step(gan, a, b, pools, gan_params, optimizers, scaler, autocast(torch.device("cpu"), "fp32"))

    step()  # warm-up: oneDNN builds its kernels on first use
    tick = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - tick) / steps


def _measure(model: str, kernels: str, steps: int) -> float:
    env = os.environ | {"HEMAFLOW_CPU_KERNELS": kernels}
    code = f"import json, sys; sys.path.insert(0, 'benchmarks'); import reproducibility as r; print(json.dumps(r._worker({model!r}, {steps})))"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each kernel set (median reported)")
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    print("| model | pinned AVX2 s/step | native s/step | pinned / native |\n|---|---:|---:|---:|")
    for model in MODELS:
        times: dict[str, list[float]] = {"avx2": [], "native": []}
        for _ in range(args.repeats):
            for kernels in times:
                times[kernels].append(_measure(model, kernels, args.steps))
        pinned, native = statistics.median(times["avx2"]), statistics.median(times["native"])
        print(f"| {model} | {pinned:.4f} | {native:.4f} | {pinned / native:.2f} |")


if __name__ == "__main__":
    main()
