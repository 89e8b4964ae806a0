"""The forward pass's explicit input bundle. The engine builds one per step; the model reads it
and touches no other state.

Layout: a step packs S sequences flat, T tokens in all. Sequence s owns tokens
`query_start_loc[s]:query_start_loc[s+1]`; its context after the step is `seq_lens[s]` tokens,
of which the last `query_len` are new.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class RowHandle(Protocol):
    """Engram rows for one step, fetched ahead of time (see offload/prefetch.py)."""

    def wait(self, layer_id: int) -> torch.Tensor:
        """Block until `layer_id`'s rows are ready; returns float rows `[T, (N-1)*H, W]`."""
        ...


@dataclass
class AttentionMetadata:
    query_start_loc: torch.Tensor  # [S+1] int64, cumulative new tokens per sequence
    seq_lens: torch.Tensor  # [S] int64, context length after this step
    block_tables: torch.Tensor  # [S, max_blocks] int64, KV block ids (padding: 0)
    slot_mapping: torch.Tensor  # [T] int64, KV slot of each new token: block * block_size + offset
    max_seq_len: int  # max(seq_lens), kept on the host to avoid a device sync
    is_decode_only: bool  # every sequence has exactly one new token
    # The host's copies of what a mixed batch loops over (reading the tensors would sync).
    query_start_host: list[int]  # [S+1] query_start_loc
    seq_lens_host: list[int]  # [S] seq_lens
    decode_seqs: torch.Tensor  # [S_dec] int64, the sequences with one new token

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def query_lens(self) -> torch.Tensor:  # [S]
        return self.query_start_loc[1:] - self.query_start_loc[:-1]


@dataclass
class CacheTensors:
    """Per-layer state that outlives a step. Allocation policy lives in engine/kv_cache.py."""

    k: list[torch.Tensor]  # per layer [num_blocks, block_size, num_kv_heads, head_dim]
    v: list[torch.Tensor]  # per layer, same shape
    # demo-variant Engram short conv: per Engram layer [max_num_seqs, history_len, hc_mult * D]
    engram_conv: dict[int, torch.Tensor]

    @property
    def block_size(self) -> int:
        return self.k[0].shape[1]


@dataclass
class ForwardBatch:
    token_ids: torch.Tensor  # [T] int64, raw token ids
    positions: torch.Tensor  # [T] int64
    attn: AttentionMetadata
    cache: CacheTensors
    state_slots: torch.Tensor  # [S] int64, each sequence's row in the per-sequence state tensors
    logits_indices: torch.Tensor  # [S'] int64, token positions whose logits are sampled
    fresh_state_slots: torch.Tensor  # [F] int64, state slots of sequences starting at position 0
    engram_rows: RowHandle | None = None  # None: the model has no Engram layers
