"""Same data, params and code give the same bytes whatever CPU kernels the machine would pick.

On one machine, two kernel choices stand for two machines: the environment variables below are
how oneDNN, ATen and MKL let a process pretend to have only AVX2 or to use AVX-512. hemaflow pins
all three to the AVX2 level (hemaflow/__init__.py), so both runs must write identical models and
metrics. The control run with ``HEMAFLOW_CPU_KERNELS=native`` shows that the choice does matter
on this machine when nothing pins it (skipped where the CPU has no AVX-512: then the two choices
are the same machine). OpenCV, which the detector's image transforms run on, picks its SIMD
code by CPU as well; ``OPENCV_CPU_DISABLE`` masks its AVX2 and AVX paths to stand for an older
machine.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import detector_params, hemaflow_command, run, train_detector_command

pytestmark = pytest.mark.slow

WIDE = {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "MKL_ENABLE_INSTRUCTIONS": "AVX512"}
NARROW = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
OPENCV_MASKED = {"OPENCV_CPU_DISABLE": "AVX2,AVX,FP16,SSE4_1,SSE4_2"}


def _has_avx512() -> bool:
    return "avx512f" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else False


def _train(tiny_models, out: Path, kernels: dict[str, str]) -> tuple[dict, dict]:
    command = hemaflow_command(
        "train-classifier",
        "--params",
        str(tiny_models.params_file),
        "--method",
        "none",
        "--cells",
        str(tiny_models.cells),
        "--crops",
        str(tiny_models.crops),
        "--prepared",
        str(tiny_models.prepared),
        "--out",
        str(out / "models"),
        "--metrics",
        str(out / "metrics.json"),
        "--plots",
        str(out / "plots"),
        "--state",
        str(out / "state"),
    )
    env = {k: v for k, v in os.environ.items() if k not in (*WIDE, "HEMAFLOW_CPU_KERNELS")} | kernels
    run(command, env=env)
    metrics = json.loads((out / "metrics.json").read_text())
    metrics.pop("train_images_per_second")
    metrics.pop("conditions")
    return load_file(out / "models" / "fold0.safetensors"), metrics


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_training_gives_the_same_bytes_under_two_kernel_choices(tiny_models, tmp_path):
    wide_weights, wide_metrics = _train(tiny_models, tmp_path / "wide", WIDE)
    narrow_weights, narrow_metrics = _train(tiny_models, tmp_path / "narrow", NARROW)
    assert _same(wide_weights, narrow_weights) and wide_metrics == narrow_metrics
    if not _has_avx512():
        pytest.skip("no AVX-512 on this CPU: the control run needs two different kernel sets")
    native_wide, _ = _train(tiny_models, tmp_path / "native_wide", WIDE | {"HEMAFLOW_CPU_KERNELS": "native"})
    native_narrow, _ = _train(tiny_models, tmp_path / "native_narrow", NARROW | {"HEMAFLOW_CPU_KERNELS": "native"})
    assert not _same(native_wide, native_narrow), "unpinned kernels gave identical bytes: the test shows nothing"


def _train_detector(tiny_prepared, out: Path, environment: dict[str, str]) -> dict:
    prepared, base = tiny_prepared
    out.mkdir(parents=True)
    # the photometric distortion runs in OpenCV
    params = detector_params(out / "params.yaml", base, epochs=2, color_augment=True)
    env = {k: v for k, v in os.environ.items() if k not in ("OPENCV_CPU_DISABLE", "HEMAFLOW_CPU_KERNELS")}
    run(train_detector_command(params, prepared, out), env=env | environment)
    return load_file(out / "model" / "best.safetensors")


def test_the_detector_gives_the_same_bytes_whatever_simd_opencv_could_use(tiny_prepared, tmp_path):
    assert _same(
        _train_detector(tiny_prepared, tmp_path / "all", {}),
        _train_detector(tiny_prepared, tmp_path / "masked", OPENCV_MASKED),
    )
    native = {"HEMAFLOW_CPU_KERNELS": "native"}
    native_all = _train_detector(tiny_prepared, tmp_path / "native_all", native)
    native_masked = _train_detector(tiny_prepared, tmp_path / "native_masked", native | OPENCV_MASKED)
    assert not _same(native_all, native_masked), "OpenCV's SIMD level changed nothing: the test shows nothing"
