"""Engine flags, made from the config dataclasses' fields (a new field is a new flag with no
other change), and the engine they describe: shared by the entry points (`engram-serve generate`,
the server's processes)."""

from __future__ import annotations

import argparse
import dataclasses
import typing

from engram_serve.config import EngineConfig, OffloadConfig
from engram_serve.engine.engine import Engine
from engram_serve.llm import build_engine

_FLAG_HELP = {
    "max_num_seqs": "most requests running at once",
    "max_num_batched_tokens": "most tokens in one step (prefill chunk size)",
    "max_model_len": "context length (default: the model's)",
    "kv_block_size": "tokens per KV block",
    "num_kv_blocks": "KV blocks (default: kv_cache_bytes / block size)",
    "kv_cache_bytes": "KV cache budget in bytes",
    "max_waiting": "waiting-queue limit; beyond it requests are refused (HTTP 503)",
    "tier": "where Engram tables live: device | host | disk | remote",
    "cache_rows": "fast-tier Engram row cache capacity in rows (0: none)",
    "prefetch": "fetch Engram rows ahead of the layers that need them",
    "lookahead": "also read the next step's prompt rows into the row cache during this step "
    "(default: on for the disk tier)",
    "kv_cache_dtype": "KV cache element type (auto: float16 on the CPU and under float32 models)",
    "quantization": "backbone weights: auto (the model's GGUF blocks on the CPU where it has "
    "them), none (dense in --dtype), gguf, or quantized at load: q4_0, q4_1, q8_0",
    "remote_master": "remote tier: the Mooncake master HOST:PORT the tables were published to",
    "remote_protocol": "remote tier: the store's transport (rdma in production)",
    "table_path": "directory of the Engram tables (default: the model's engram_tables/)",
}


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls, prefix: str = "") -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + (prefix + f.name).replace("_", "-")
        kind = hints[f.name]
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
        if base is bool:
            parser.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=f.default,
                help=_FLAG_HELP.get(f.name),
            )
        else:
            literal = typing.get_origin(kind) is typing.Literal
            convert = base if base in (int, float) else str
            parser.add_argument(
                flag,
                type=convert,
                default=f.default,
                dest=prefix + f.name,
                choices=typing.get_args(kind) if literal else None,
                help=_FLAG_HELP.get(f.name),
            )


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="model directory or .gguf file (default: the embedded SmolLM2)",
    )
    parser.add_argument("--no-engram", action="store_true", help="run without Engram layers")
    _add_dataclass_flags(parser.add_argument_group("engine"), EngineConfig)
    _add_dataclass_flags(parser.add_argument_group("engram offload"), OffloadConfig, "engram_")


def configs_from_args(args: argparse.Namespace) -> tuple[EngineConfig, OffloadConfig]:
    engine = EngineConfig(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)}
    )
    offload = OffloadConfig(
        **{f.name: getattr(args, "engram_" + f.name) for f in dataclasses.fields(OffloadConfig)}
    )
    return engine, offload


def engine_from_args(args: argparse.Namespace) -> Engine:
    """The engine the flags describe (the model built or loaded, the tables opened)."""
    engine_config, offload_config = configs_from_args(args)
    return build_engine(args.model, engine_config, offload_config, not args.no_engram)
