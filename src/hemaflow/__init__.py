"""hemaflow: reproducible white-blood-cell detection, stain translation and classification.

Importing any part of hemaflow first pins the CPU math libraries to one instruction-set level,
before torch loads them: oneDNN (convolutions), ATen (element-wise ops and reductions) and MKL
(matrix products, in conditional-reproducibility mode) then compute the same bits on every
x86-64 machine with AVX2, whether it also has AVX-512 or not, and OpenCV runs its baseline code.
Left to themselves they pick the widest kernels each CPU offers, and the trained models of two
machines drift apart (the committed metrics once moved by up to 0.2 on a clean clone). The cost
is measured in ``benchmarks/reproducibility.py``; ``HEMAFLOW_CPU_KERNELS=native`` turns the
pinning off for speed, at the price of results that depend on the machine. The thread count is
pinned per run by ``pin_threads`` (``base.cpu_threads``), since it changes the order of sums too.
"""

import os
import sys

CPU_KERNEL_PINS = {
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2,STRICT",  # STRICT: matrix products identical whatever the thread count
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "MKL_DYNAMIC": "FALSE",
    "OMP_DYNAMIC": "FALSE",
}

if os.environ.get("HEMAFLOW_CPU_KERNELS", "avx2") != "native":
    os.environ.update(CPU_KERNEL_PINS)
    # OpenCV (the detector's and albumentations' image transforms) dispatches by CPU too, and its
    # IPP dispatches again: off, every CPU runs the same baseline code. Its AVX-512 paths cannot
    # be masked by OPENCV_CPU_DISABLE, whose parser splits the name AVX512-SKX at the hyphen.
    import cv2

    cv2.setUseOptimized(False)


def pin_threads(count: int) -> None:
    """CPU math on ``count`` threads: set before torch loads (as the CLI does), applied at once if it has."""
    os.environ.update({name: str(count) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")})
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(count)
