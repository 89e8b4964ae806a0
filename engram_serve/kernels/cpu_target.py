"""How numba compiles the CPU kernels: for this machine's CPU, with 512-bit vectors where the CPU
has them.

numba compiles for the host CPU, but LLVM tunes its code for Intel's AVX-512 server CPUs to
256-bit vectors (early AVX-512 chips lowered their clocks for wider ones). On the Emerald Rapids
machines this project also runs on, 512-bit vectors made kernels/cpu_linear.py 1.4x faster at
64 rows and the fused decode layers of a 64-sequence round 1.1x faster (`python -m
engram_serve.bench.kernels --linear`, `engram-serve bench throughput`). On a CPU without
AVX-512 the setting changes nothing.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

FEATURES_ENV = "NUMBA_CPU_FEATURES"  # numba's own variable; a value set by the user wins


def prefer_wide_vectors() -> None:
    """Let numba use 512-bit vectors. Must run before numba compiles its first function (the
    package's __init__ calls it): code already compiled keeps its vectors. numba's on-disk cache
    keys code by these features, so no kernel compiled with other settings is reused."""
    if os.environ.get(FEATURES_ENV):
        return
    import llvmlite.binding as llvm

    features = llvm.get_host_cpu_features().flatten() + ",-prefer-256-bit"
    os.environ[FEATURES_ENV] = features  # read by numba at import, and by its worker processes
    import numba

    numba.config.CPU_FEATURES = features  # in case numba was imported first


def key_cache_by_sources(default_dir: Path) -> None:
    """Keep numba's compiled kernels in a directory named by a hash of the package's numba
    modules (~3 ms at import). Must run before the first kernel module is imported.

    numba checks a cached function against its own file only. The fused decode layer
    (cpu_decode.py) inlines the tiles of cpu_quant.py and cpu_linear.py, so after an edit to a
    tile the old fused layer still loaded from the cache and ran: a tile made 1.25-1.6x faster
    did not show until the cache was deleted by hand. Here any edit to any numba module gives
    every kernel a new directory. The directory is under $NUMBA_CACHE_DIR where it is set (the
    Docker image sets it), else under `default_dir`; where it cannot be written, numba falls
    back to its own places. The setting is numba's, so it holds for every cached numba function
    of the process.
    """
    import numba

    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        source = path.read_bytes()
        if b"numba" in source:
            digest.update(str(path.relative_to(package)).encode() + b"\0" + source)
    base = os.environ.get("NUMBA_CACHE_DIR") or default_dir
    numba.config.CACHE_DIR = str(Path(base) / digest.hexdigest()[:16])


def has_bf16_matmul() -> bool:
    """Whether torch's bfloat16 matmuls run on bfloat16 instructions here (AMX or
    AVX512-BF16), which is what makes them faster than float32's."""
    import torch

    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


def bf16_matmul_path() -> str:
    """Which hardware torch's bfloat16 matmuls (oneDNN) run on here, as the start-up log says
    it: AMX tiles, AVX512-BF16 dot products, or float32 arithmetic on converted values (slower
    than float32 itself: a bfloat16 model there saves memory only)."""
    import torch

    if torch.cpu._is_amx_tile_supported():
        return "bfloat16 matmuls on AMX tiles (oneDNN)"
    if torch.cpu._is_avx512_bf16_supported():
        return "bfloat16 matmuls on AVX512-BF16 (oneDNN)"
    return "no bfloat16 matmul instructions: bfloat16 is converted to float32 arithmetic"


def compiles_avx512() -> bool:
    """Whether numba's code here may use AVX-512F instructions: the CPU features it compiles for
    (prefer_wide_vectors sets them from the host's unless the user did)."""
    import llvmlite.binding as llvm
    import numba

    features = numba.config.CPU_FEATURES or llvm.get_host_cpu_features().flatten()
    return "+avx512f" in features.split(",")
