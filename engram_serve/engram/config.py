"""An Engram model's memory, as configured in `engram.json`: where its layers sit, how it
hashes, what its tables hold."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

EngramVariant = Literal["demo", "v41"]
TableDtype = Literal["float32", "bfloat16", "float16", "fp8_e4m3"]


@dataclass(frozen=True)
class EngramConfig:
    """One model's Engram memory: where it sits, how it hashes, what its tables hold.

    Field names follow the reference demo (`engram_vocab_size`, `max_ngram_size`, ...) so that
    `engram.json` and the golden fixtures read the same.
    """

    variant: EngramVariant = "demo"
    layer_ids: tuple[int, ...] = (1, 14)
    max_ngram_size: int = 3  # N: n-gram orders 2..N
    n_head_per_ngram: int = 8  # H: hash heads per order
    engram_vocab_size: tuple[int, ...] = (65536, 65536)  # table height per head, one per order
    head_dim: int = 64  # W: width of one table row (the demo's n_embed_per_ngram // H)
    seed: int = 0
    pad_id: int = 2  # a RAW token id; compressed before use
    hc_mult: int = 1  # residual branches (mHC); 1 for a dense backbone
    kernel_size: int = 4  # demo variant's short conv
    table_dtype: TableDtype = "float32"
    rms_norm_eps: float = 1e-6  # v41 gate norms (the demo uses the dtype's machine epsilon)
    quant_block: int = 32  # fp8 tables: one UE8M0 scale per this many values

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer_ids", tuple(int(i) for i in self.layer_ids))
        sizes = self.engram_vocab_size
        if isinstance(sizes, int):
            sizes = (sizes,) * (self.max_ngram_size - 1)
        object.__setattr__(self, "engram_vocab_size", tuple(int(s) for s in sizes))
        if self.variant not in ("demo", "v41"):
            raise ValueError(f"unknown Engram variant {self.variant!r}; expected 'demo' or 'v41'")
        if self.max_ngram_size < 2:
            raise ValueError(f"max_ngram_size must be >= 2, got {self.max_ngram_size}")
        if len(self.engram_vocab_size) != self.max_ngram_size - 1:
            raise ValueError(
                f"engram_vocab_size has {len(self.engram_vocab_size)} entries; "
                f"max_ngram_size={self.max_ngram_size} needs one per order 2..N"
            )
        if len(set(self.layer_ids)) != len(self.layer_ids):
            raise ValueError(f"layer_ids must be distinct, got {self.layer_ids}")
        if self.table_dtype == "fp8_e4m3" and self.head_dim % self.quant_block:
            raise ValueError(f"fp8 rows must be a multiple of {self.quant_block} wide")

    @property
    def num_orders(self) -> int:
        return self.max_ngram_size - 1

    @property
    def num_heads(self) -> int:
        """Hash columns per token per layer: (N-1) * H."""
        return self.num_orders * self.n_head_per_ngram

    @property
    def n_embed_per_ngram(self) -> int:
        """Width of one order's rows concatenated (the reference demo's name)."""
        return self.head_dim * self.n_head_per_ngram

    @property
    def engram_dim(self) -> int:
        """Width of the concatenated rows a token reads per layer."""
        return self.num_heads * self.head_dim

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> EngramConfig:
        """Build from `engram.json` or a fixture config; accepts the V4.1 spellings too."""
        raw = dict(raw)
        if "n_heads" in raw:  # V4.1 spelling
            raw.setdefault("n_head_per_ngram", raw.pop("n_heads"))
        if "n_embed_per_ngram" in raw:  # demo spelling: one order's width, split across heads
            width, heads = int(raw.pop("n_embed_per_ngram")), int(raw.get("n_head_per_ngram", 8))
            if width % heads:
                raise ValueError(f"n_embed_per_ngram={width} is not divisible by {heads} heads")
            raw["head_dim"] = width // heads
        if raw.get("variant") == "v41":
            raw.setdefault("table_dtype", "fp8_e4m3")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    @classmethod
    def from_json(cls, path: str | Path) -> EngramConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["layer_ids"] = list(self.layer_ids)
        out["engram_vocab_size"] = list(self.engram_vocab_size)
        return out
