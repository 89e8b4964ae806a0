"""`engram-serve bench gpu-check` (engram_serve/bench/gpu_check.py) without CUDA: its one-line
refusal, and how it tells a failed run. Its parts run on CUDA in tests/gpu/test_bench_gpu_check.py.
"""

from __future__ import annotations

import pytest
import torch

from engram_serve.bench import gpu_check


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_refuses_in_one_line_without_cuda(tmp_path):
    with pytest.raises(SystemExit) as refusal:
        gpu_check.main(["--out", str(tmp_path / "out.json")])
    assert str(refusal.value).startswith("gpu-check needs a CUDA device")
    assert "\n" not in str(refusal.value)
    assert not (tmp_path / "out.json").exists()


def test_failures_name_failed_parts_and_differing_tiers():
    report = {
        "seconds": {"device": 0.1},
        "device": {"name": "H100"},
        "uva_gather": {"error": "RuntimeError: boom"},
        "tiers_bitwise": {"disk + hbm cache": {"bit_exact": False}, "host": {"bit_exact": True}},
    }
    assert gpu_check.failures(report) == ["uva_gather", "disk + hbm cache differs"]
