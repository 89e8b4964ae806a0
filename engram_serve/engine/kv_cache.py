"""Paged KV cache: a fixed pool of blocks of `block_size` token slots, handed out to requests as
they grow and returned when they finish or are preempted. The tensors themselves are a
`CacheTensors` (model/batch.py); this file owns who may use which block."""

from __future__ import annotations

import math
import mmap
from collections import deque

import torch

from engram_serve.config import ModelConfig
from engram_serve.device import DeviceRuntime
from engram_serve.model.batch import CacheTensors


def kv_bytes_per_block(model: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    per_token = 2 * model.num_hidden_layers * model.num_key_value_heads * model.attn_head_dim
    return per_token * block_size * torch.tensor([], dtype=dtype).element_size()


def allocate_cache(
    model: ModelConfig,
    num_blocks: int,
    block_size: int,
    kv_dtype: torch.dtype,
    engram_conv_shapes: dict[int, tuple[int, ...]],
    state_dtype: torch.dtype,  # the Engram convolutions' history: the model's activations
    runtime: DeviceRuntime,
) -> CacheTensors:
    shape = (num_blocks, block_size, model.num_key_value_heads, model.attn_head_dim)
    num_layers = model.num_hidden_layers

    def zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if runtime.device.type == "cpu":
            return zero_pages(shape, dtype)
        return runtime.empty(shape, dtype).zero_()

    return CacheTensors(
        k=[zeros(shape, kv_dtype) for _ in range(num_layers)],
        v=[zeros(shape, kv_dtype) for _ in range(num_layers)],
        engram_conv={layer: zeros(conv, state_dtype) for layer, conv in engram_conv_shapes.items()},
    )


def zero_pages(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero CPU tensor in an anonymous memory mapping: the OS hands out zeroed pages as they
    are first written, so the process holds (RSS) only the part of the cache in use, not its
    whole budget (a 2 GiB pool costs nothing until requests fill it)."""
    count = math.prod(shape)
    if count == 0:
        return torch.zeros(shape, dtype=dtype)
    mapping = mmap.mmap(-1, count * dtype.itemsize)
    return torch.frombuffer(mapping, dtype=dtype, count=count).view(shape)  # keeps the mapping


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0..1."""
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_needed(self, block_ids: list[int], num_tokens: int) -> int:
        """How many more blocks a request holding `block_ids` needs to store `num_tokens`."""
        return max(0, -(-num_tokens // self.block_size) - len(block_ids))

    def grow(self, block_ids: list[int], num_tokens: int) -> bool:
        """Extend `block_ids` in place to hold `num_tokens`; False (and no change) if the pool
        is short."""
        needed = self.blocks_needed(block_ids, num_tokens)
        if needed > len(self._free):
            return False
        block_ids.extend(self._free.popleft() for _ in range(needed))
        return True

    def free(self, block_ids: list[int]) -> None:
        self._free.extend(block_ids)
        block_ids.clear()
