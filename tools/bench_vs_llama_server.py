"""engram-serve against llama.cpp's llama-server on this machine, served, side by side.

The protocol of docs/cpu-serving.md: the same GGUF (the default model's Q4_1 file), random
128-token prompts, 64 output tokens, greedy, ignore_eos, streamed, through `engram-serve bench
serve` at each concurrency; each round starts every server fresh, in alternating order (A B, then
B A), and reads their resident memory idle after start and at the end. `--also` adds engram-serve
in other dtypes and weight formats to the same rounds. llama-server is built by
tools/build_llama_server.sh (about 14 minutes, once); not part of CI.

    python tools/bench_vs_llama_server.py [--concurrency 1 8 64] [--rounds 2]
        [--engram-args "--kv-cache-dtype float32"] [--also float32/gguf float32/none]
        [--output results/vs_llama_server.json]

Prints a table (medians over rounds) and writes the JSON and a PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from engram_serve.bench.harness import alternating, figure, machine, save, say
from engram_serve.model.default_model import packaged_gguf_path

ROOT = Path(__file__).resolve().parent.parent
PORT = 8321
PROMPTS = {1: 8, 8: 32, 64: 128}  # requests per run: several rounds of the concurrency
METRICS = ("output_throughput", "median_ttft_ms", "median_itl_ms")
PANELS = {"output_throughput": "output tok/s", "median_ttft_ms": "TTFT p50 (ms)",
          "median_itl_ms": "ITL p50 (ms)"}  # fmt: skip
ENGRAM = str(Path(sys.executable).parent / "engram-serve")


def llama_server_command(binary: str, gguf: Path, threads: int) -> list[str]:
    return [binary, "-m", str(gguf), "-c", "16384", "-np", "64", "-t", str(threads),
            "--host", "127.0.0.1", "--port", str(PORT), "--log-disable"]  # fmt: skip


def engram_command(extra: str) -> list[str]:
    return [ENGRAM, "serve", "--port", str(PORT), "--log-level", "warning", *shlex.split(extra)]


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for process {pid}")


def wait_ready(process: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{process.args[0]} not ready after {timeout_s} s")


def run_one(command: list[str], concurrency: int, out: Path) -> dict:
    """Start a server, read its idle memory, run the benchmark, read its memory, stop it."""
    with subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as server:
        try:
            wait_ready(server)
            time.sleep(2)  # let start-up work settle before reading idle memory
            idle = rss_mib(server.pid)
            num_prompts = PROMPTS.get(concurrency, 2 * concurrency)
            subprocess.run(
                [ENGRAM, "bench", "serve", "--base-url", f"http://127.0.0.1:{PORT}",
                 "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency),
                 "--input-len", "128", "--output-len", "64", "--ignore-eos", "--no-plot",
                 "--no-progress", "--output", str(out)],
                check=True, stdout=subprocess.DEVNULL,
            )  # fmt: skip
            report = json.loads(out.read_text())
            report["rss_idle_mib"], report["rss_peak_mib"] = idle, rss_mib(server.pid, "VmHWM")
            return report
        finally:
            server.terminate()
            server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="llama-server -t")
    parser.add_argument("--engram-args", default="", help="flags added to engram-serve serve")
    parser.add_argument("--also", nargs="*", default=[], metavar="DTYPE/QUANTIZATION",
                        help="more engram-serve servers in the same rounds, e.g. float32/gguf")
    parser.add_argument("--llama-build", default=str(ROOT / "build" / "llama.cpp"))
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "vs_llama_server.json")
    args = parser.parse_args()

    built = subprocess.run([str(ROOT / "tools" / "build_llama_server.sh"), args.llama_build],
                           check=True, capture_output=True, text=True)  # fmt: skip
    binary = built.stdout.strip().splitlines()[-1]
    commands = {
        "llama-server": llama_server_command(binary, packaged_gguf_path(), args.threads),
        "engram-serve": engram_command(args.engram_args),
    }
    for spec in args.also:
        dtype, _, quantization = spec.partition("/")
        flags = f"{args.engram_args} --dtype {dtype} --quantization {quantization or 'auto'}"
        commands[f"engram-serve {spec}"] = engram_command(flags)
    scratch = args.output.with_suffix(".runs")
    scratch.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict[int, list[dict]]] = {name: {} for name in commands}
    for concurrency in args.concurrency:
        for round_, name in alternating(list(commands), args.rounds):
            report = run_one(commands[name], concurrency, scratch / f"{name}-c{concurrency}.json")
            runs[name].setdefault(concurrency, []).append(report)
            say(f"c={concurrency} round {round_} {name}: "
                + ", ".join(f"{m} {report[m]:.1f}" for m in METRICS)
                + f", RSS idle {report['rss_idle_mib']:.0f} MiB")  # fmt: skip

    table = {
        name: {
            c: {m: statistics.median(r[m] for r in reports)
                for m in (*METRICS, "rss_idle_mib", "rss_peak_mib", "failed")}  # fmt: skip
            for c, reports in by_c.items()
        }
        for name, by_c in runs.items()
    }
    print(f"{'c':>4} {'llama tok/s':>12} {'ours tok/s':>11} {'ratio':>6} "
          f"{'TTFT llama/ours ms':>20} {'ITL llama/ours ms':>18} "
          f"{'RSS idle llama/ours MiB':>24}")  # fmt: skip
    for name in list(commands)[1:]:
        if name != "engram-serve":
            print(name)
        for c in args.concurrency:
            lm, us = table["llama-server"][c], table[name][c]
            print(f"{c:>4} {lm['output_throughput']:>12.1f} {us['output_throughput']:>11.1f} "
                  f"{us['output_throughput'] / lm['output_throughput']:>6.2f} "
                  f"{lm['median_ttft_ms']:>9.0f} / {us['median_ttft_ms']:<8.0f} "
                  f"{lm['median_itl_ms']:>8.1f} / {us['median_itl_ms']:<7.1f} "
                  f"{lm['rss_idle_mib']:>11.0f} / {us['rss_idle_mib']:<10.0f}")  # fmt: skip
    report = {
        "machine": machine(),
        "commands": commands,
        "protocol": "random 128-token prompts, 64 output tokens, greedy, ignore_eos, streamed",
        "rounds": args.rounds,
        "median": table,
        "runs": {n: {c: [{m: r[m] for m in (*METRICS, "rss_idle_mib", "rss_peak_mib")}
                         for r in rs] for c, rs in by_c.items()} for n, by_c in runs.items()},
    }  # fmt: skip

    def plot(path: Path) -> None:
        with figure(path, ncols=len(PANELS), size=(15, 4)) as (_, axes):
            for ax, (metric, title) in zip(axes, PANELS.items(), strict=True):
                width = 0.8 / len(commands)
                for i, server in enumerate(commands):
                    values = [table[server][c][metric] for c in args.concurrency]
                    ax.bar([x + width * i for x in range(len(values))], values, width,
                           label=server)  # fmt: skip
                ax.set_xticks([x + 0.4 - width / 2 for x in range(len(args.concurrency))],
                              [f"c={c}" for c in args.concurrency])  # fmt: skip
                ax.set_title(title)
                ax.legend()

    save(report, args.output, plot)

if __name__ == "__main__":
    main()
