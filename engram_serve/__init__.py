"""engram-serve: an OpenAI-compatible server for Engram-augmented language models."""

import os

# torch's CPU allocator puts tensors of 2 MiB and more on transparent huge pages when asked
# (read once, at its first large allocation, so before torch is used). Weights, KV cache and
# activations then cost fewer TLB misses: ~4% more throughput on the default model here, and it
# removes a placement effect that made otherwise equal engines differ by up to 6%.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from engram_serve.config import cache_dir  # noqa: E402
from engram_serve.kernels.cpu_target import key_cache_by_sources, prefer_wide_vectors  # noqa: E402

prefer_wide_vectors()  # before any numba kernel compiles
key_cache_by_sources(cache_dir() / "numba")

from engram_serve.engine.request import (  # noqa: E402
    RequestOutput,
    SamplingParams,
    StructuredOutputs,
)
from engram_serve.llm import LLM  # noqa: E402

__all__ = ["LLM", "RequestOutput", "SamplingParams", "StructuredOutputs"]
__version__ = "0.1.0"
