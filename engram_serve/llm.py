"""Offline API, shaped like vLLM's:

from engram_serve import LLM, SamplingParams
llm = LLM()                                   # the embedded default model
outputs = llm.generate(["Hello"], SamplingParams(max_tokens=16))
print(outputs[0].outputs[0].text)
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from engram_serve.config import EngineConfig, OffloadConfig
from engram_serve.device import CpuRuntime, DeviceRuntime, get_runtime
from engram_serve.engine.engine import Engine, EngramRuntime
from engram_serve.engine.request import RequestOutput, SamplingParams
from engram_serve.engine.tokenizer import Tokenizer
from engram_serve.engine.tool_calls import ToolUse
from engram_serve.engram.compression import load_compression
from engram_serve.engram.ngram_hash import NgramHasher
from engram_serve.engram.tables import open_table, read_engram_config, verify_tables
from engram_serve.kernels.cpu_target import bf16_matmul_path, has_bf16_matmul
from engram_serve.model.gguf import GGUF_WEIGHTS
from engram_serve.model.loader import load_model, load_model_config, set_parameter

ENGRAM_MODULES_FILE = "engram_modules.safetensors"
logger = logging.getLogger(__name__)


def resolve_model_dir(model: str | Path | None) -> Path:
    """None: the embedded default; a `.gguf` file: converted once into the cache; else a
    Hugging Face-style directory."""
    from engram_serve.model.default_model import default_model_dir

    if model is None:
        return default_model_dir()
    path = Path(model)
    if path.suffix == ".gguf":
        return _converted_gguf(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model {model!r} is neither a directory nor a .gguf file")
    return path


def _converted_gguf(path: Path) -> Path:
    """A GGUF file converted once into the cache, keyed by its path, size and mtime."""
    import hashlib

    from engram_serve.config import cache_dir
    from engram_serve.model.gguf import convert_gguf

    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    out = cache_dir() / "gguf" / f"{path.stem}-{key.hexdigest()[:12]}"
    if not (out / "config.json").is_file():
        convert_gguf(path, out)
    return out


def build_engine(
    model: str | Path | None = None,
    engine_config: EngineConfig = EngineConfig(),
    offload_config: OffloadConfig = OffloadConfig(),
    enable_engram: bool = True,
    runtime: DeviceRuntime | None = None,
) -> Engine:
    """Load a model directory (its backbone, tokenizer and Engram tables) into an Engine on
    `engine_config.device`. `runtime`: that device's runtime (device.py), made here if None."""
    runtime = runtime or get_runtime(engine_config.device)  # no CUDA: fails before any load
    model_dir = resolve_model_dir(model)
    if engine_config.num_threads:
        torch.set_num_threads(engine_config.num_threads)
    engram_config = read_engram_config(model_dir) if enable_engram else None
    if engram_config is not None:  # a broken table fails in seconds, before the backbone loads
        verify_tables(model_dir, full=False, table_files=offload_config.tier != "remote")
    engine_config = resolve_engine_config(engine_config, model_dir)
    quantization, dtype = engine_config.quantization, engine_config.dtype
    on_cpu_bf16 = dtype == "bfloat16" and runtime.device.type == "cpu"
    logger.info(
        "weights %s, %s activations%s, KV cache %s on %s%s",
        quantization,
        dtype,
        " (products of many rows: prefill, batched decode; the rest float32)"
        if quantization != "none"
        else "",
        engine_config.cache_dtype,
        engine_config.device,
        f"; {bf16_matmul_path()}" if on_cpu_bf16 else "",
    )
    net = load_model(model_dir, getattr(torch, dtype), engram_config, runtime, quantization)
    tokenizer = Tokenizer(model_dir)
    engram = None
    if engram_config is not None:
        load_engram_modules(net, model_dir / ENGRAM_MODULES_FILE, runtime)
        engram = _engram_runtime(model_dir, engram_config, tokenizer, offload_config, runtime)
    config = load_model_config(model_dir)
    return Engine(net, config, tokenizer, engine_config, engram, runtime)


def resolve_engine_config(config: EngineConfig, model_dir: Path) -> EngineConfig:
    """`config` with "auto" resolved for this model, device and CPU (docs/cpu-serving.md):
    quantization "gguf" where the directory has its GGUF and the device is the CPU, else
    "none"; dtype "bfloat16" for quantized weights on a CPU with bfloat16 matmul instructions
    (AMX or AVX512-BF16: prefill 2.2x faster, decode unchanged, greedy text kept), else
    "float32"."""
    quantization, dtype = config.quantization, config.dtype
    on_cpu = config.device == "cpu"
    if quantization == "auto":
        quantization = "gguf" if on_cpu and (model_dir / GGUF_WEIGHTS).is_file() else "none"
    if dtype == "auto":
        native_bf16 = on_cpu and has_bf16_matmul()
        dtype = "bfloat16" if quantization != "none" and native_bf16 else "float32"
    return dataclasses.replace(config, quantization=quantization, dtype=dtype)


def load_engram_modules(
    net: torch.nn.Module, path: Path, runtime: DeviceRuntime | None = None
) -> None:
    """The Engram modules' own weights (gate norms, projections), separate from the tables."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the model declares Engram layers")
    weights = load_file(path)
    params = {n: p for n, p in net.named_parameters() if ".engram." in n}
    if set(weights) != set(params):
        missing, extra = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
        raise ValueError(f"{path}: missing tensors {missing}, unexpected tensors {extra}")
    runtime = runtime or CpuRuntime()
    for name, value in weights.items():
        set_parameter(net, name, runtime.upload(value.to(params[name].dtype)))


def _engram_runtime(
    model_dir, engram_config, tokenizer, offload_config, runtime: DeviceRuntime
) -> EngramRuntime:
    from engram_serve.offload.prefetch import build_prefetcher

    hasher = NgramHasher(engram_config, load_compression(tokenizer.hf_tokenizer))
    if offload_config.tier == "remote":  # the published copy, checked against engram.json
        from engram_serve.offload.remote import open_published

        tables = open_published(
            model_dir, offload_config.remote_master, offload_config.remote_protocol
        )
    else:
        tables = {layer: open_table(model_dir, layer) for layer in engram_config.layer_ids}
    for layer, table in tables.items():
        expected = int(hasher.table_rows[engram_config.layer_ids.index(layer)])
        if table.rows != expected:
            raise ValueError(
                f"{table.path or 'the published table'} has {table.rows} rows; engram.json and "
                f"the tokenizer give {expected} for layer {layer}"
            )
    return EngramRuntime(hasher, build_prefetcher(engram_config, tables, offload_config, runtime))


def split_options(options: dict[str, Any]) -> tuple[EngineConfig, OffloadConfig]:
    """`LLM(..., max_num_seqs=8, engram_tier="disk")`: engine options by their EngineConfig
    names, offload options by their OffloadConfig names prefixed with `engram_`."""
    engine_names = {f.name for f in fields(EngineConfig)}
    offload_names = {f"engram_{f.name}": f.name for f in fields(OffloadConfig)}
    unknown = set(options) - engine_names - set(offload_names)
    if unknown:
        raise TypeError(f"unknown engine options: {sorted(unknown)}")
    engine = EngineConfig(**{k: v for k, v in options.items() if k in engine_names})
    offload = OffloadConfig(
        **{offload_names[k]: v for k, v in options.items() if k in offload_names}
    )
    return engine, offload


class LLM:
    def __init__(self, model: str | Path | None = None, enable_engram: bool = True, **options):
        engine_config, offload_config = split_options(options)
        self.engine = build_engine(model, engine_config, offload_config, enable_engram)

    @classmethod
    def from_engine(cls, engine: Engine) -> LLM:
        llm = cls.__new__(cls)
        llm.engine = engine
        return llm

    def get_tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[str] | list[int] | list[list[int]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. Prompts are strings or token-id lists."""
        prompts = _as_prompt_list(prompts)
        params = sampling_params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        ids = []
        for prompt, sampling in zip(prompts, params):
            text = prompt if isinstance(prompt, str) else None
            token_ids = self.engine.tokenizer.encode(prompt) if text is not None else prompt
            ids.append(self.engine.add_request(token_ids, sampling, prompt=text).request_id)
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | None = None,
        use_tqdm: bool = False,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        parallel_tool_calls: bool = True,
    ) -> list[RequestOutput]:
        """One RequestOutput per conversation (a list of OpenAI-shaped messages, or a list of
        them). `tools`, `tool_choice`, `parallel_tool_calls`: as in OpenAI's chat completions
        (engine/tool_calls.py); with tools offered, each CompletionOutput's `tool_calls` lists
        the calls found in its text (else it is None). Raises ValueError for bad tools, or for a
        forced call (tool_choice "required" or named) with `sampling_params.structured_outputs`
        set."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        params = sampling_params or SamplingParams()
        tool_use = ToolUse.from_openai(tools, tool_choice, parallel_tool_calls)
        if tool_use is not None:
            params = tool_use.constrain(params)
        tokenizer = self.engine.tokenizer
        prompts = [tokenizer.apply_chat_template(c, True, tool_use) for c in conversations]
        outputs = self.generate(prompts, params, use_tqdm)
        if tool_use is not None:
            for completion in (output.outputs[0] for output in outputs):
                completion.tool_calls = list(tool_use.parse(completion.text).tool_calls)
        return outputs

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        with tqdm(total=len(request_ids), disable=not use_tqdm, desc="generate") as bar:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        bar.update(1)
        return [finished[i] for i in request_ids]


def _as_prompt_list(prompts) -> list[str | list[int]]:
    if isinstance(prompts, str):
        return [prompts]
    if prompts and isinstance(prompts[0], int):
        return [list(prompts)]
    return list(prompts)
