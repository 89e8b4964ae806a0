"""`engram-serve bench gpu-check` (engram_serve/bench/gpu_check.py): its parts at small sizes on
CUDA, so `make test-gpu` proves what `make gpu-check` reports (tests/test_gpu_check.py: the rest).
"""

from __future__ import annotations

import pytest

from engram_serve.bench import gpu_check
from engram_serve.config import OffloadConfig
from engram_serve.device import get_runtime

pytestmark = pytest.mark.gpu


def test_uva_gather_reads_the_rows_asked_for_at_some_rate():
    """(uva_gather itself checks that the rows read are the rows asked for.)"""
    out = gpu_check.uva_gather(get_runtime("cuda"), table_gib=0.25, repeats=3)
    for step in gpu_check.STEP_ROWS:
        rates = [out[step][m]["gb_s"] for m in ("index_select_uint8", "index_select_int64",
                                                 "triton_gather")]  # fmt: skip
        assert all(rate > 0 for rate in rates), out


def test_every_cached_tier_is_bit_exact_beside_a_busy_compute_stream():
    out = gpu_check.tiers_bitwise(get_runtime("cuda"), num_steps=8)
    assert set(out) == set(gpu_check.CACHED_TIERS)
    assert all(r["bit_exact"] for r in out.values()), out


def test_a_decode_step_downloads_once_and_never_waits_for_the_whole_device():
    """The engine's contract (engine.py): the sampled tokens' download is a step's one
    synchronisation."""
    out = gpu_check.engine_syncs(OffloadConfig(), num_seqs=2, decode_steps=4)
    assert out["decode_steps"] == 4
    assert out["max"]["download"] == 1, out
    assert out["max"].get("device_synchronize", 0) == 0, out
