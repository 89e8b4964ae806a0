"""Test helpers: tiny Hugging Face checkpoints and a minimal stand-in for the engine's batching.

`PagedRun` plays the engine's part with the simplest allocation that still exercises paging:
sequence s owns blocks 1 + s, 1 + s + S, 1 + s + 2S, ... (interleaved, so a block-table bug shows),
block 0 is only ever padding, and sequence s keeps its per-sequence state in slot S - 1 - s.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from engram_serve.config import ModelConfig
from engram_serve.model.batch import AttentionMetadata, CacheTensors, ForwardBatch, RowHandle

# A model directory's backbone: what a copy needs besides its Engram parts.
BACKBONE_FILES = (
    "config.json",
    "model.safetensors",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)


def attention_metadata(
    query_lens: list[int], seq_lens: list[int], block_tables: list[list[int]], slots: torch.Tensor
) -> AttentionMetadata:
    """CPU metadata of a step, as the engine builds it: the host lists beside the tensors."""
    query_start = [0, *torch.tensor(query_lens).cumsum(0).tolist()]
    return AttentionMetadata(
        query_start_loc=torch.tensor(query_start),
        seq_lens=torch.tensor(seq_lens),
        block_tables=torch.tensor(block_tables),
        slot_mapping=slots,
        max_seq_len=max(seq_lens),
        is_decode_only=all(n == 1 for n in query_lens),
        query_start_host=query_start,
        seq_lens_host=list(seq_lens),
        decode_seqs=torch.tensor([s for s, n in enumerate(query_lens) if n == 1], dtype=torch.long),
    )


def randomize_(model: nn.Module, std: float = 0.2, seed: int = 0) -> None:
    """Large random weights (HF's init is tiny, zero biases, unit norms), so that attention is
    sharp, positions matter, and biases and norm weights change the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.2 * noise if "norm" in name else std * noise)


def save_tiny_hf(
    path: Path, hf_config, seed: int = 0, **save_kwargs
) -> nn.Module:  # -> the transformers model, float32, eval mode
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager")
    randomize_(model, seed=seed)
    model.save_pretrained(path, **save_kwargs)
    return model.eval()


def model_config_of(hf_config) -> ModelConfig:
    """Our ModelConfig of a transformers config, read the way the loader reads a directory."""
    from engram_serve.model.loader import load_model_config

    archs = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
    hf_config.architectures = [archs[hf_config.model_type]]
    with tempfile.TemporaryDirectory() as tmp:
        hf_config.save_pretrained(tmp)
        return load_model_config(tmp)


def hf_logits(model: nn.Module, token_ids: Sequence[int]) -> torch.Tensor:  # [L, vocab]
    with torch.no_grad():
        return model(input_ids=torch.tensor([list(token_ids)])).logits[0].float()


class PagedRun:
    """Feeds several sequences through `model` in steps, as the engine would.

    `step({s: n, ...})` runs the next n tokens of each listed sequence in one packed batch and
    returns the logits of every token it ran; `run(schedule)` collects them per sequence.
    """

    def __init__(
        self,
        model: nn.Module,
        config: ModelConfig,
        sequences: Sequence[Sequence[int]],
        block_size: int = 4,
        engram_conv: dict[int, torch.Tensor] | None = None,
        make_rows: Callable[[list[tuple[int, int]]], RowHandle] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.model, self.sequences, self.make_rows = model, [list(s) for s in sequences], make_rows
        self.num_seqs, self.block_size = len(sequences), block_size
        self.blocks_per_seq = -(-max(map(len, sequences)) // block_size)
        num_blocks = 1 + self.num_seqs * self.blocks_per_seq
        shape = (num_blocks, block_size, config.num_key_value_heads, config.attn_head_dim)
        layers = range(config.num_hidden_layers)
        # Garbage in the padding block: masking must keep it out (finite, as the engine's zeros).
        self.cache = CacheTensors(
            k=[torch.full(shape, 1e3, dtype=dtype) for _ in layers],
            v=[torch.full(shape, 1e3, dtype=dtype) for _ in layers],
            engram_conv=engram_conv or {},
        )
        self.done = [0] * self.num_seqs  # tokens already run, per sequence

    def block_id(self, seq: int, logical_block: int) -> int:
        return 1 + seq + logical_block * self.num_seqs

    def step(self, new_tokens: dict[int, int]) -> dict[int, torch.Tensor]:
        batch = self.build_batch(new_tokens)
        logits = self.model(batch)  # [T, vocab]: every token is sampled here
        out, start = {}, 0
        for seq, n in new_tokens.items():
            out[seq] = logits[start : start + n]
            self.done[seq] += n
            start += n
        return out

    def run(self, schedule: Sequence[dict[int, int]]) -> list[torch.Tensor]:
        """Logits `[len(seq), vocab]` for each sequence, gathered over the schedule's steps."""
        pieces: list[list[torch.Tensor]] = [[] for _ in range(self.num_seqs)]
        for new_tokens in schedule:
            for seq, logits in self.step(new_tokens).items():
                pieces[seq].append(logits)
        return [torch.cat(p) for p in pieces]

    def build_batch(self, new_tokens: dict[int, int]) -> ForwardBatch:
        token_ids, positions, slots, query_lens, seq_lens, tables, where = (
            [],
            [],
            [],
            [],
            [],
            [],
            [],
        )
        for seq, n in new_tokens.items():
            start, end = self.done[seq], self.done[seq] + n
            if n < 1 or end > len(self.sequences[seq]):
                raise ValueError(f"sequence {seq}: cannot run tokens {start}:{end}")
            token_ids += self.sequences[seq][start:end]
            positions += range(start, end)
            slots += [self.block_id(seq, p // self.block_size) * self.block_size
                      + p % self.block_size for p in range(start, end)]  # fmt: skip
            where += [(seq, p) for p in range(start, end)]
            query_lens.append(n)
            seq_lens.append(end)
            tables.append([self.block_id(seq, b) for b in range(-(-end // self.block_size))])
        width = max(map(len, tables))
        tables = [t + [0] * (width - len(t)) for t in tables]  # block 0 pads
        long = torch.int64
        attn = attention_metadata(query_lens, seq_lens, tables, torch.tensor(slots, dtype=long))
        fresh = [self.num_seqs - 1 - s for s, n in new_tokens.items() if self.done[s] == 0]
        return ForwardBatch(
            token_ids=torch.tensor(token_ids, dtype=long),
            positions=torch.tensor(positions, dtype=long),
            attn=attn,
            cache=self.cache,
            state_slots=torch.tensor([self.num_seqs - 1 - s for s in new_tokens], dtype=long),
            logits_indices=torch.arange(len(token_ids)),
            fresh_state_slots=torch.tensor(fresh, dtype=long),
            engram_rows=self.make_rows(where) if self.make_rows else None,
        )


def counting(fn: Callable, calls: list) -> Callable:
    """fn, noting each call in `calls`."""

    def counted(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)

    return counted
