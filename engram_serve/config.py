"""Frozen, typed configuration. Derived values are properties; nothing discovered at run time
is ever written back here (run-time facts live in the objects that discover them)."""

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


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder, read from a Hugging Face `config.json`."""

    architecture: str = "LlamaForCausalLM"
    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # Qwen2: bias on q/k/v
    qk_norm: bool = False  # Qwen3: RMSNorm on q and k per head
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class EngineConfig:
    """Scheduling and memory budgets of one engine."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    kv_block_size: int = 16
    num_kv_blocks: int | None = None  # None: derived from kv_cache_bytes
    kv_cache_bytes: int = 2 << 30
    max_waiting: int = 1024  # waiting-queue limit; beyond it add_request refuses
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    num_threads: int | None = None


@dataclass(frozen=True)
class OffloadConfig:
    """Where the Engram tables live and how rows reach the model."""

    tier: Literal["device", "host", "disk"] = "device"
    cache_rows: int = 0  # fast-tier row cache capacity over all layers (0: none)
    prefetch: bool = True
    # Read the next step's known prompt rows into the cache during this step (needs prefetch and
    # a cache). None: on for the disk tier, whose reads of a prefill chunk's rows outlast the one
    # layer of compute before the first Engram layer (random prompts, `engram-serve bench
    # offload`: stall 1.7 -> 0.4 s a run; output tokens/s 1.03x over 4 rounds in one process,
    # level in the benchmark's 2 rounds, whose runs swing by more).
    lookahead: bool | None = None
    table_path: str | None = None
    num_io_threads: int = 16
    cache_bytes: int = 0  # alternative to cache_rows: a byte budget for cached rows
    cache_policy: Literal["lru", "lfu"] = "lfu"  # dynamic admission: lfu measured best
    hot_profile: str | None = None  # RowProfile file (`tables profile`): static hot set
    hot_fraction: float = 0.5  # share of the cache given to the profiled hot set
    host_gather: Literal["auto", "uva", "staged"] = "auto"  # host tier on CUDA
    shm_name: str | None = None  # host tier: share one /dev/shm copy across processes
    direct_io: bool = False  # disk tier: O_DIRECT reads that bypass the OS page cache

    @property
    def looks_ahead(self) -> bool:
        """`lookahead` resolved: asked for, or left to the tier (on for disk)."""
        return self.tier == "disk" if self.lookahead is None else self.lookahead

    def __post_init__(self) -> None:
        if self.tier not in ("device", "host", "disk"):
            raise ValueError(f"engram tier must be device, host or disk, got {self.tier!r}")
        if self.cache_rows < 0 or self.cache_bytes < 0:
            raise ValueError("engram cache size must be >= 0")
        if self.cache_rows and self.cache_bytes:
            raise ValueError("give the engram cache size in rows or in bytes, not both")
        if self.cache_policy not in ("lru", "lfu"):
            raise ValueError(f"engram cache policy must be lru or lfu, got {self.cache_policy!r}")
        if not 0.0 <= self.hot_fraction <= 1.0:
            raise ValueError(f"hot_fraction must be in [0, 1], got {self.hot_fraction}")
        if self.host_gather not in ("auto", "uva", "staged"):
            raise ValueError(f"host_gather must be auto, uva or staged, got {self.host_gather!r}")
        if self.num_io_threads < 1:
            raise ValueError(f"num_io_threads must be >= 1, got {self.num_io_threads}")


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None
    shutdown_timeout_s: float = 30.0  # in-flight requests' time to finish after SIGTERM
    max_request_bytes: int = 4 << 20
    workers: int = 1  # server processes, each with its own engine
    stats_interval_s: float = 10.0  # between stats log lines; 0: none
