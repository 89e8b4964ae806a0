"""engram-serve's offline single stream against llama-cpp-python on this machine, side by side.

Both run the default model's GGUF (Q4_1): ours as `LLM()` with its defaults, the peer as
`llama_cpp.Llama(model_path=..., n_threads=2)` (the llama.cpp of llama-cpp-python 0.3.36, built
by tools/build_llama_server.sh with the same flags as llama-server: about 14 minutes, once; not
part of CI). Each round both generate `--max-tokens` tokens, greedy, ignoring EOS, after the same
prompt: a window of real text (pydoc topics, `--prompt-len` tokens), a new one each round so that
neither reuses a cached prefix. Ours through `LLM.generate`, the peer through `Llama.generate`.

The two engines live in worker processes loaded once, which take turns (A B, then B A) while the
other waits on its input; the table is the median over rounds of the output tokens per second
over the whole request (prompt included) and of the decode rate after the first token.

    python tools/bench_vs_llama_cpp_python.py [--rounds 6] [--max-tokens 128] [--prompt-len 32]
        [--output results/vs_llama_cpp_python.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from engram_serve.bench.harness import alternating, machine, save, say
from engram_serve.bench.throughput import text_corpus
from engram_serve.model.default_model import default_model_dir, packaged_gguf_path

ROOT = Path(__file__).resolve().parent.parent

# Each worker: load, warm up, then per input line (a JSON list of prompt ids) one timed greedy
# generation, answered as a JSON line {"seconds", "first_token_seconds", "tokens"}.
OURS = """
import json, sys, time
from engram_serve import LLM, SamplingParams
llm = LLM()
params = SamplingParams(temperature=0.0, max_tokens={max_tokens}, ignore_eos=True)
llm.generate([[1, 2, 3, 4]], params)
print("ready", flush=True)
for line in sys.stdin:
    start = time.perf_counter()
    [out] = llm.generate([json.loads(line)], params)
    seconds = time.perf_counter() - start
    first = out.metrics.first_token_time - out.metrics.arrival_time
    print(json.dumps({{"seconds": seconds, "first_token_seconds": first,
                      "tokens": out.outputs[0].token_ids}}), flush=True)
"""
PEER = """
import json, sys, time
import llama_cpp
llm = llama_cpp.Llama(model_path={gguf!r}, n_ctx=1024, n_batch=512, n_threads={threads},
                      n_threads_batch={threads}, verbose=False)
def generate(prompt):
    tokens, first = [], None
    for token in llm.generate(prompt, temp=0.0, reset=True):
        tokens.append(token)
        first = first or time.perf_counter()
        if len(tokens) == {max_tokens}:
            return tokens, first
generate([1, 2, 3, 4])
print("ready", flush=True)
for line in sys.stdin:
    llm.reset()
    start = time.perf_counter()
    tokens, first = generate(json.loads(line))
    seconds = time.perf_counter() - start
    print(json.dumps({{"seconds": seconds, "first_token_seconds": first - start,
                      "tokens": tokens}}), flush=True)
"""


class Worker:
    def __init__(self, python: str, script: str, env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen([python, "-c", script], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
        line = self.process.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"{python} worker did not start (exit {self.process.wait()})")

    def run(self, prompt: list[int]) -> dict:
        self.process.stdin.write(json.dumps(prompt) + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp's threads")
    parser.add_argument("--llama-build", default=str(ROOT / "build" / "llama.cpp"))
    parser.add_argument("--output", type=Path,
                        default=ROOT / "results" / "vs_llama_cpp_python.json")  # fmt: skip
    args = parser.parse_args()

    subprocess.run([str(ROOT / "tools" / "build_llama_server.sh"), args.llama_build],
                   check=True, capture_output=True)  # fmt: skip
    build = Path(args.llama_build)
    gguf = packaged_gguf_path()
    corpus = text_corpus(default_model_dir(progress=False))
    step = len(corpus) // (args.rounds + 1)
    prompts = [corpus[i * step : i * step + args.prompt_len].tolist() for i in range(args.rounds)]
    fields = {"max_tokens": args.max_tokens, "threads": args.threads, "gguf": str(gguf)}
    workers = {
        "engram-serve": Worker(sys.executable, OURS.format(**fields)),
        "llama-cpp-python": Worker(
            str(build / "venv" / "bin" / "python"), PEER.format(**fields),
            env={**os.environ, "LLAMA_CPP_LIB_PATH": str(build / "lib")},
        ),
    }  # fmt: skip
    runs: dict[str, list[dict]] = {name: [] for name in workers}
    try:
        for round_, name in alternating(list(workers), args.rounds):
            result = workers[name].run(prompts[round_])
            result["output_tok_s"] = args.max_tokens / result["seconds"]
            result["decode_tok_s"] = (args.max_tokens - 1) / (
                result["seconds"] - result["first_token_seconds"]
            )
            runs[name].append(result)
            say(f"round {round_ + 1}/{args.rounds} {name}: {result['output_tok_s']:.1f} tok/s, "
                f"decode {result['decode_tok_s']:.1f} tok/s, first token "
                f"{1e3 * result['first_token_seconds']:.0f} ms")  # fmt: skip
    finally:
        for worker in workers.values():
            worker.close()

    metrics = ("output_tok_s", "decode_tok_s", "first_token_seconds")
    median = {
        n: {m: statistics.median(r[m] for r in rs) for m in metrics} for n, rs in runs.items()
    }
    same = [
        sum(a == b for a, b in zip(x["tokens"], y["tokens"], strict=True))
        for x, y in zip(runs["engram-serve"], runs["llama-cpp-python"], strict=True)
    ]
    ours, peer = median["engram-serve"], median["llama-cpp-python"]
    print(f"{'':18} {'tok/s':>7} {'decode tok/s':>13} {'first token ms':>15}")
    for name, m in median.items():
        print(f"{name:18} {m['output_tok_s']:>7.1f} {m['decode_tok_s']:>13.1f} "
              f"{1e3 * m['first_token_seconds']:>15.0f}")  # fmt: skip
    print(f"ratio (ours / llama-cpp-python): {ours['output_tok_s'] / peer['output_tok_s']:.3f}, "
          f"decode {ours['decode_tok_s'] / peer['decode_tok_s']:.3f}; identical greedy tokens "
          f"per round {same} of {args.max_tokens}")  # fmt: skip
    report = {
        "machine": machine(),
        "protocol": f"{args.prompt_len}-token prompts of pydoc text, {args.max_tokens} output "
        "tokens, greedy, ignore EOS, alternating rounds",
        "median": median,
        "same_tokens_per_round": same,
        "runs": {n: [{m: r[m] for m in metrics} for r in rs] for n, rs in runs.items()},
    }
    save(report, args.output)


if __name__ == "__main__":
    main()
