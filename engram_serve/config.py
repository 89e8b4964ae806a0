"""Frozen, typed configuration. Derived values are properties; nothing discovered at run time
is ever written back here (run-time facts live in the objects that discover them)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal


def cache_dir() -> Path:
    """Where engram-serve keeps what it derives once and reuses: converted models, compression
    tables, compiled kernels. $ENGRAM_SERVE_CACHE (the Docker image's one writable path) or
    ~/.cache/engram-serve."""
    return Path(os.environ.get("ENGRAM_SERVE_CACHE", Path.home() / ".cache" / "engram-serve"))


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
    # The activations' dtype. "auto": bfloat16 for quantized weights on a CPU with bfloat16
    # matmul instructions (their products of many rows only: prefill, batched decode), else
    # float32 (llm.py).
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # The KV cache's element type. "auto": float16 on the CPU (half float32's bytes; the CPU
    # kernels convert in registers) and under a float32 model, else the model's dtype.
    kv_cache_dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    # The backbone's weights (model/loader.py): "none" dense in `dtype`; "gguf" the model's GGUF
    # blocks as they are; q4_0, q4_1, q8_0 quantized at load. "auto": "gguf" on the CPU where
    # the model directory has its GGUF (one converted from a GGUF file, the default model),
    # else "none".
    quantization: Literal["auto", "none", "gguf", "q4_0", "q4_1", "q8_0"] = "auto"
    device: str = "cpu"
    num_threads: int | None = None

    @property
    def cache_dtype(self) -> str:
        """`kv_cache_dtype` resolved."""
        if self.kv_cache_dtype != "auto":
            return self.kv_cache_dtype
        return (
            "float16" if self.device == "cpu" or self.dtype in ("auto", "float32") else self.dtype
        )


@dataclass(frozen=True)
class OffloadConfig:
    """Where the Engram tables live and how rows reach the model."""

    tier: Literal["device", "host", "disk", "remote"] = "device"
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
    # remote tier: the Mooncake master (HOST:PORT) of the store the tables were published to
    # (`engram-serve tables publish`), and the transport its rows come over
    remote_master: str | None = None
    remote_protocol: Literal["tcp", "rdma"] = "tcp"

    @property
    def looks_ahead(self) -> bool:
        """`lookahead` resolved: asked for, or left to the tier (on for disk and remote)."""
        return self.tier in ("disk", "remote") if self.lookahead is None else self.lookahead

    def __post_init__(self) -> None:
        if self.tier not in ("device", "host", "disk", "remote"):
            raise ValueError(f"engram tier must be device, host, disk or remote, got {self.tier!r}")
        if (self.tier == "remote") != (self.remote_master is not None):
            raise ValueError(
                "the remote tier needs the store's master (--engram-remote-master HOST:PORT), "
                "and only the remote tier takes one"
            )
        if self.remote_protocol not in ("tcp", "rdma"):
            raise ValueError(f"remote protocol must be tcp or rdma, got {self.remote_protocol!r}")
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
