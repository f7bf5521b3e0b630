"""hemaflow: reproducible white-blood-cell detection, stain translation and classification.

Importing any part of hemaflow first pins the CPU math libraries to one instruction-set level,
before torch loads them: oneDNN (convolutions), ATen (element-wise ops and reductions) and MKL
(matrix products, in conditional-reproducibility mode) then compute the same bits on every
x86-64 machine with AVX2, whether it also has AVX-512 or not. Left to themselves they pick the
widest kernels each CPU offers, and the trained models of two machines drift apart (the
committed metrics once moved by up to 0.2 on a clean clone). The cost is measured in
``benchmarks/reproducibility.py``; ``HEMAFLOW_CPU_KERNELS=native`` turns the pinning off for
speed, at the price of results that depend on the machine. The thread count is pinned per run
by ``hemaflow.runtime.configure`` (``base.cpu_threads``), since it changes the order of sums too.
"""

import os

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
