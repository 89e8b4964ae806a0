"""`engram-serve serve | generate | bench | tables`.

Engine and offload flags are made from the config dataclasses' fields, so a new field is a new
flag with no other change.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from collections.abc import Callable

from engram_serve.config import EngineConfig, OffloadConfig

_FLAG_HELP = {
    "max_num_seqs": "most requests running at once",
    "max_num_batched_tokens": "most tokens in one step (prefill chunk size)",
    "max_model_len": "context length (default: the model's)",
    "kv_block_size": "tokens per KV block",
    "num_kv_blocks": "KV blocks (default: kv_cache_bytes / block size)",
    "kv_cache_bytes": "KV cache budget in bytes",
    "max_waiting": "waiting-queue limit; beyond it requests are refused (HTTP 503)",
    "tier": "where Engram tables live: device | host | disk",
    "cache_rows": "fast-tier Engram row cache capacity in rows (0: none)",
    "prefetch": "fetch Engram rows ahead of the layers that need them",
    "table_path": "directory of the Engram tables (default: the model's engram_tables/)",
}


def _add_dataclass_flags(parser: argparse.ArgumentParser, cls, prefix: str = "") -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + (prefix + f.name).replace("_", "-")
        kind = hints[f.name]
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                help=_FLAG_HELP.get(f.name))
        else:
            convert = base if base in (int, float) else str
            parser.add_argument(flag, type=convert, default=f.default,
                                help=_FLAG_HELP.get(f.name), dest=prefix + f.name)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="model directory or .gguf file (default: the embedded SmolLM2)")
    parser.add_argument("--no-engram", action="store_true", help="run without Engram layers")
    _add_dataclass_flags(parser.add_argument_group("engine"), EngineConfig)
    _add_dataclass_flags(parser.add_argument_group("engram offload"), OffloadConfig, "engram_")


def configs_from_args(args: argparse.Namespace) -> tuple[EngineConfig, OffloadConfig]:
    engine = EngineConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)})
    offload = OffloadConfig(
        **{f.name: getattr(args, "engram_" + f.name) for f in dataclasses.fields(OffloadConfig)}
    )
    return engine, offload


def engine_from_args(args: argparse.Namespace):
    from engram_serve.llm import build_engine

    engine_config, offload_config = configs_from_args(args)
    return build_engine(args.model, engine_config, offload_config, not args.no_engram)


def _generate(args: argparse.Namespace) -> None:
    from engram_serve.engine.request import SamplingParams
    from engram_serve.llm import LLM

    llm = LLM.from_engine(engine_from_args(args))
    sampling = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed
    )
    if args.chat:
        outputs = llm.chat([{"role": "user", "content": args.prompt}], sampling)
    else:
        outputs = llm.generate(args.prompt, sampling)
    completion = outputs[0].outputs[0]
    if args.json:
        print(json.dumps({"text": completion.text, "token_ids": completion.token_ids,
                          "finish_reason": completion.finish_reason}))
    else:
        print(completion.text)


def _subcommand(sub, name: str, help: str, run: Callable, engine: bool = True):
    parser = sub.add_parser(name, help=help)
    if engine:
        add_engine_args(parser)
    parser.set_defaults(run=run)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="engram-serve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    from engram_serve.server.api import add_server_args, run_server

    add_server_args(_subcommand(sub, "serve", "serve the OpenAI-compatible HTTP API", run_server))

    gen = _subcommand(sub, "generate", "complete one prompt and print the result", _generate)
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--json", action="store_true", help="print JSON with token ids")

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    _add_bench_commands(bench)
    tables = sub.add_parser("tables", help="Engram table files").add_subparsers(
        dest="tables", required=True
    )
    _add_table_commands(tables)
    return parser


def _add_bench_commands(bench) -> None:
    from engram_serve.bench import hashing

    p = bench.add_parser("hashing", help="n-gram hashing against the reference algorithm")
    p.set_defaults(run=lambda args: hashing.main([]))


def _add_table_commands(tables) -> None:
    from engram_serve.model import tables as table_files

    def verify(args):
        report = table_files.verify_tables(args.model_dir, full=not args.quick)
        print(json.dumps(report, indent=2, default=str))

    p = tables.add_parser("verify", help="check table files against their manifest")
    p.add_argument("model_dir")
    p.add_argument("--quick", action="store_true", help="sizes, headers and quick checksums only")
    p.set_defaults(run=verify)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
