"""`engram-serve serve | generate | bench | tables` (the engine's flags: engine_args.py)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from engram_serve.engine_args import add_engine_args, engine_from_args


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
        print(
            json.dumps(
                {
                    "text": completion.text,
                    "token_ids": completion.token_ids,
                    "finish_reason": completion.finish_reason,
                }
            )
        )
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

    from engram_serve.server.process import add_server_args, run_server

    add_server_args(_subcommand(sub, "serve", "serve the OpenAI-compatible HTTP API", run_server))

    gen = _subcommand(sub, "generate", "complete one prompt and print the result", _generate)
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--json", action="store_true", help="print JSON with token ids")

    bench = sub.add_parser("bench", help="benchmarks; `engram-serve bench NAME --help`")
    bench.add_argument("name", choices=sorted(BENCHMARKS))
    bench.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own flags")
    bench.set_defaults(run=_bench)
    tables = sub.add_parser("tables", help="Engram table files").add_subparsers(
        dest="tables", required=True
    )
    _add_table_commands(tables)
    return parser


BENCHMARKS = {
    "throughput": "engram_serve.bench.throughput",
    "offload": "engram_serve.bench.offload",
    "hashing": "engram_serve.bench.hashing",
    "kernels": "engram_serve.bench.kernels",
    "serve": "engram_serve.bench.serve",
    "soak": "engram_serve.bench.soak",
    "gpu-check": "engram_serve.bench.gpu_check",
}


def _bench(args: argparse.Namespace) -> None:
    import importlib

    importlib.import_module(BENCHMARKS[args.name]).main(args.args)


def _tables_init(args: argparse.Namespace) -> None:
    from engram_serve.engine.tokenizer import Tokenizer
    from engram_serve.engram.compression import load_compression, num_compressed
    from engram_serve.engram.config import EngramConfig
    from engram_serve.engram.tables import read_engram_config
    from engram_serve.model.retrofit import init_tables

    config = (
        EngramConfig.from_json(args.config) if args.config else read_engram_config(args.model_dir)
    )
    if config is None:
        raise SystemExit(f"{args.model_dir} has no engram.json; pass --config FILE")
    lookup = load_compression(Tokenizer(args.model_dir).hf_tokenizer)
    manifest = init_tables(
        args.model_dir,
        config,
        num_compressed(lookup),
        seed=args.seed,
        dtype=args.dtype,
        identity=args.identity,
    )
    print(json.dumps(manifest, indent=2, default=str))


def _tables_verify(args: argparse.Namespace) -> None:
    from engram_serve.engram.tables import verify_tables

    print(json.dumps(verify_tables(args.model_dir, full=not args.quick), indent=2, default=str))


def _tables_profile(args: argparse.Namespace) -> None:
    from engram_serve.engine.tokenizer import Tokenizer
    from engram_serve.engram.compression import load_compression
    from engram_serve.engram.ngram_hash import NgramHasher
    from engram_serve.engram.tables import read_engram_config
    from engram_serve.llm import resolve_model_dir
    from engram_serve.offload.cache import profile_rows

    model_dir = resolve_model_dir(args.model)
    tokenizer = Tokenizer(model_dir)
    hasher = NgramHasher(read_engram_config(model_dir), load_compression(tokenizer.hf_tokenizer))
    documents = (tokenizer.encode(Path(f).read_text(encoding="utf-8")) for f in args.files)
    profile = profile_rows(hasher, documents, top_k=args.top_k)
    profile.save(args.output)
    print(f"profiled {profile.num_tokens} tokens -> {args.output}")


def _tables_publish(args: argparse.Namespace) -> None:
    from engram_serve.offload.remote import publish

    print(json.dumps(publish(args.model_dir, args.remote_master, args.remote_protocol)))


def _tables_unpublish(args: argparse.Namespace) -> None:
    from engram_serve.offload.remote import unpublish

    print(json.dumps(unpublish(args.model_dir, args.remote_master, args.remote_protocol)))


def _add_table_commands(tables) -> None:
    p = tables.add_parser("init", help="create seeded random Engram tables with a manifest")
    p.add_argument("model_dir")
    p.add_argument("--config", help="an engram.json to use (default: the directory's own)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "fp8_e4m3"])
    p.add_argument("--seed", type=int, default=0, help="seed of the table contents")
    p.add_argument(
        "--identity",
        action="store_true",
        help="zero the value path, so outputs equal the backbone's",
    )
    p.set_defaults(run=_tables_init)

    p = tables.add_parser("verify", help="check table files against their manifest")
    p.add_argument("model_dir")
    p.add_argument("--quick", action="store_true", help="sizes, headers and quick checksums only")
    p.set_defaults(run=_tables_verify)

    for name, run, help in (
        ("publish", _tables_publish, "put the tables into a Mooncake store (the remote tier)"),
        ("unpublish", _tables_unpublish, "remove the tables from a Mooncake store"),
    ):
        p = tables.add_parser(name, help=help)
        p.add_argument("model_dir")
        p.add_argument("--remote-master", required=True, help="the store's master, HOST:PORT")
        p.add_argument("--remote-protocol", choices=["tcp", "rdma"], default="tcp")
        p.set_defaults(run=run)

    p = tables.add_parser("profile", help="count Engram row hits over text files")
    p.add_argument("files", nargs="+")
    p.add_argument("--model", default=None, help="model directory (default: the embedded one)")
    p.add_argument("--top-k", type=int, default=None, help="keep the k hottest rows per layer")
    p.add_argument("--output", default="engram_profile.npz")
    p.set_defaults(run=_tables_profile)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except KeyboardInterrupt:
        sys.exit(130)
    except (OSError, ValueError, RuntimeError) as err:  # bad models, tables, flags: no traceback
        print(f"engram-serve: error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
