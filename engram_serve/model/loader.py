"""Hugging Face model directories -> `ModelConfig` and a loaded `LlamaForCausalLM`.

A directory holds `config.json`, optionally `generation_config.json`, and the weights as
`model.safetensors` or shards listed in `model.safetensors.index.json`. Tensor names are
Hugging Face's, which are the model's own, so loading is a name-for-name copy.

Loading never holds two copies of the weights: the model is built on the `meta` device (shapes
only, no storage) and each parameter is materialised straight from its safetensors file.
"""

from __future__ import annotations

import contextlib
import json
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from engram_serve.config import ModelConfig
from engram_serve.device import CpuRuntime, DeviceRuntime
from engram_serve.engram.config import EngramConfig
from engram_serve.kernels.cpu_quant import QUANTIZABLE, QuantizedWeight
from engram_serve.model.engram import build_engram
from engram_serve.model.gguf import GGUF_WEIGHTS, gguf_tensor_names, read_gguf_weights
from engram_serve.model.linear import Weight, set_weight
from engram_serve.model.llama import SUPPORTED_ROPE_TYPES, LlamaForCausalLM

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Checkpoint entries that are not parameters: older Llama exports saved RoPE's buffer.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
MAX_LISTED = 5  # names quoted in one error message
QUANTIZATIONS = ("none", "gguf", *QUANTIZABLE)
QUANTIZED_SUFFIXES = ("_proj.weight", "embed_tokens.weight", "lm_head.weight")
# What a module's reset_parameters may call, skipped while a model is built on the meta device.
_INITIALIZERS = (
    *("uniform_", "normal_", "trunc_normal_", "zeros_", "ones_"),
    *("kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_"),
)


class ModelLoadError(ValueError):
    """A model directory that cannot be loaded; the message names the file or tensor."""


# ---------------------------------------------------------------- config


def load_model_config(path: str | Path) -> ModelConfig:
    """Read `config.json` (+ `generation_config.json` for EOS ids) of a Llama-family model."""
    model_dir = Path(path)
    config_path = model_dir / "config.json"
    raw = _read_json(config_path)
    arch = _architecture(raw, config_path)
    _check_supported_features(raw, arch, config_path)
    rope_theta, rope_scaling = _rope(raw, config_path)

    def need(key: str) -> Any:
        if key not in raw:
            raise ModelLoadError(f"{config_path}: required field {key!r} is missing")
        return raw[key]

    num_heads = int(need("num_attention_heads"))
    return ModelConfig(
        architecture=arch,
        vocab_size=int(need("vocab_size")),
        hidden_size=int(need("hidden_size")),
        intermediate_size=int(need("intermediate_size")),
        num_hidden_layers=int(need("num_hidden_layers")),
        num_attention_heads=num_heads,
        num_key_value_heads=int(raw.get("num_key_value_heads") or num_heads),
        head_dim=raw.get("head_dim"),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        # Qwen2 always has q/k/v bias (its config has no flag); Qwen3 always has q/k norms.
        attention_bias=arch == "Qwen2ForCausalLM" or bool(raw.get("attention_bias", False)),
        qk_norm=arch == "Qwen3ForCausalLM",
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=_eos_ids(raw, model_dir / "generation_config.json"),
    )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelLoadError(f"{path} not found (is {path.parent} a Hugging Face model directory?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"{path} is not valid JSON: {err}") from err


def _architecture(raw: dict[str, Any], config_path: Path) -> str:
    archs = raw.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"{config_path}: unsupported architecture {arch!r}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


def _check_supported_features(raw: dict[str, Any], arch: str, config_path: Path) -> None:
    problems = []
    if raw.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {raw['hidden_act']!r} (only 'silu')")
    if raw.get("mlp_bias"):
        problems.append("mlp_bias")
    if raw.get("use_sliding_window"):
        problems.append("use_sliding_window")
    if problems:
        raise ModelLoadError(f"{config_path}: {arch} with unsupported {', '.join(problems)}")


def _rope(raw: dict[str, Any], config_path: Path) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling or None) from transformers 5's `rope_parameters` or the older
    `rope_theta` + `rope_scaling` (whose type key was `type`, later `rope_type`)."""
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(
            f"{config_path}: rope type {rope_type!r} unsupported; supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    return theta, None if rope_type == "default" else {"rope_type": rope_type, **params}


def _eos_ids(raw: dict[str, Any], generation_config: Path) -> tuple[int, ...]:
    """EOS ids of config.json, then any more that generation_config.json lists."""
    found = [raw.get("eos_token_id")]
    if generation_config.is_file():
        found.append(_read_json(generation_config).get("eos_token_id"))
    ids: list[int] = []
    for value in found:
        for i in [value] if isinstance(value, int) else value or []:
            if int(i) not in ids:
                ids.append(int(i))
    return tuple(ids)


# ---------------------------------------------------------------- weights


def load_model(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    engram_config: EngramConfig | None = None,
    runtime: DeviceRuntime | None = None,
    quantization: str = "none",
) -> LlamaForCausalLM:
    """Build the model of a Hugging Face directory and load its safetensors weights onto
    `runtime`'s device (default: the CPU), tensor by tensor.

    Engram modules (`model.layers.{i}.engram.*`) load from the same files when the checkpoint
    has them; a checkpoint without any keeps the modules' own initialisation.

    `quantization` (QUANTIZATIONS): "none" keeps every weight dense in `dtype`; "gguf" loads the
    backbone from the directory's model.gguf with its block-quantized weights kept as they are;
    a format of kernels/cpu_quant.QUANTIZABLE quantizes the backbone's projections, embedding
    and head as they load (llama.cpp's reference quantizer). Quantized weights run on the CPU,
    in float32 but for products of many rows (prefill, batched decode: cpu_quant.banded), which
    run in `dtype` (bfloat16 on AMX or AVX512-BF16 where asked): the model's other tensors are
    then float32.
    """
    runtime = runtime or CpuRuntime()
    model_dir = Path(path)
    config = load_model_config(model_dir)
    prefill_dtype = dtype
    if quantization != "none":  # the quantized kernels compute in float32 (prefill: `dtype`)
        dtype = torch.float32
    if quantization not in QUANTIZATIONS:
        raise ModelLoadError(f"quantization {quantization!r} unknown; use one of {QUANTIZATIONS}")
    if quantization != "none" and runtime.device.type != "cpu":
        raise ModelLoadError(
            f"quantized weights ({quantization!r}) run on the CPU only; use quantization 'none' "
            f"on {runtime.device.type}"
        )
    gguf_path = model_dir / GGUF_WEIGHTS
    if quantization == "gguf":
        if not gguf_path.is_file():
            raise ModelLoadError(
                f"quantization 'gguf' reads {gguf_path}, which is missing (a model converted "
                "from a GGUF file has it)"
            )
        where = dict.fromkeys(gguf_tensor_names(gguf_path), gguf_path)
    else:
        where = checkpoint_index(model_dir)  # tensor name -> file
    with torch.device("meta"), _initializers_skipped():
        model = LlamaForCausalLM(config, engram_config)

    expected = _expected_shapes(model)
    engram_names = {n for n in expected if ".engram." in n}
    if engram_names and not engram_names & where.keys():
        _init_engram_modules(model, dtype)
        expected = {n: s for n, s in expected.items() if n not in engram_names}
    _check_names(model_dir, expected, where, engram_config)

    if quantization == "gguf":
        weights = read_gguf_weights(gguf_path, config.num_attention_heads,
                                    config.num_key_value_heads)  # fmt: skip
        for name, value in weights:
            if name in expected:
                _set_loaded(model, gguf_path, name, value, expected, dtype, runtime, quantization)
    else:
        by_file: dict[Path, list[str]] = defaultdict(list)
        for name in expected:
            by_file[where[name]].append(name)
        for file, names in by_file.items():
            _load_file(model, file, names, expected, dtype, runtime, quantization)
    place_on_device(model, runtime)  # what the checkpoint does not hold (RoPE, fresh modules)
    model.tie_weights()
    model.fuse_projections()
    model.prefill_dtype = prefill_dtype
    _check_materialised(model)
    return model.eval()


def _check_materialised(model: nn.Module) -> None:
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a module whose tensors neither the checkpoint nor its own init provide
        raise ModelLoadError(f"tensor(s) {_listing(left)} were never loaded")


def checkpoint_index(model_dir: Path) -> dict[str, Path]:
    """Every tensor name of the checkpoint -> the safetensors file holding it."""
    single, index = model_dir / SINGLE_FILE, model_dir / INDEX_FILE
    if single.is_file():
        with _open(single) as f:
            return dict.fromkeys(f.keys(), single)
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelLoadError(f"{index} has no 'weight_map'")
        shards = {shard: model_dir / shard for shard in set(weight_map.values())}
        for shard, file in sorted(shards.items()):
            if not file.is_file():
                raise ModelLoadError(f"{index} lists shard {shard}, which is missing")
        return {name: shards[shard] for name, shard in weight_map.items()}
    raise ModelLoadError(
        f"no weights in {model_dir}: expected {SINGLE_FILE} or {INDEX_FILE} "
        "(only safetensors checkpoints are supported)"
    )


def _expected_shapes(model: LlamaForCausalLM) -> dict[str, torch.Size]:
    """The tensors a checkpoint must provide: named_parameters lists a tied lm_head only
    under its first name, the embedding's."""
    return {name: p.shape for name, p in model.named_parameters()}


@contextlib.contextmanager
def _initializers_skipped() -> Iterator[None]:
    """torch.nn.init's in-place initialisers do nothing inside: a model built on the meta device
    has no values to initialise, and the meta kernels of the random ops import torch._dynamo,
    which the server otherwise never needs (147 MiB of resident memory, measured on import)."""
    saved = {name: getattr(nn.init, name) for name in _INITIALIZERS}
    for name in _INITIALIZERS:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(nn.init, name, function)


def _init_engram_modules(model: LlamaForCausalLM, dtype: torch.dtype) -> None:
    """Replace the meta-device Engram modules by freshly initialised real ones (on the CPU;
    `place_on_device` moves them)."""
    for layer in model.model.layers:
        if layer.engram is not None:
            layer.engram = engram = build_engram(model.engram_config, model.config.hidden_size)
            for name, param in list(engram.named_parameters()):  # not Module.to: it swaps
                set_parameter(engram, name, param.detach().to(dtype))  # tensors in place


def _check_names(
    model_dir: Path,
    expected: dict[str, torch.Size],
    where: dict[str, Path],
    engram_config: EngramConfig | None,
) -> None:
    missing = [n for n in expected if n not in where]
    if missing:
        raise ModelLoadError(f"checkpoint in {model_dir} lacks tensor(s) {_listing(missing)}")
    optional = {"lm_head.weight"}  # some exports store a tied head anyway
    extra = [
        n
        for n in where
        if n not in expected and n not in optional and not n.endswith(IGNORED_SUFFIXES)
    ]
    if extra:
        hint = ""
        if engram_config is None and any(".engram." in n for n in extra):
            hint = " (the checkpoint has Engram weights: pass an Engram config)"
        raise ModelLoadError(
            f"checkpoint in {model_dir} has unexpected tensor(s) {_listing(extra)} "
            f"in {where[extra[0]].name}{hint}"
        )


def _listing(names: Iterable[str]) -> str:
    names = sorted(names)
    more = f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else ""
    return ", ".join(names[:MAX_LISTED]) + more


def _load_file(
    model: nn.Module,
    file: Path,
    names: list[str],
    expected: dict[str, torch.Size],
    dtype: torch.dtype,
    runtime: DeviceRuntime,
    quantization: str,
) -> None:
    with _open(file) as f:
        stored = set(f.keys())
        for name in names:
            if name not in stored:
                raise ModelLoadError(f"{INDEX_FILE} puts {name} in {file.name}, which lacks it")
            shape = tuple(f.get_slice(name).get_shape())
            if shape != tuple(expected[name]):  # before reading the tensor
                _wrong_shape(file, name, shape, expected)
            value = f.get_tensor(name)
            _set_loaded(model, file, name, value, expected, dtype, runtime, quantization)


def _set_loaded(
    model: nn.Module,
    file: Path,
    name: str,
    value: torch.Tensor | np.ndarray | QuantizedWeight,
    expected: dict[str, torch.Size],
    dtype: torch.dtype,
    runtime: DeviceRuntime,
    quantization: str,
) -> None:
    """One loaded tensor into the model: kept quantized (as read, or quantized now where
    `quantization` names a format and `name` is a projection, the embedding or the head), else
    dense in `dtype` on the runtime's device."""
    if isinstance(value, np.ndarray):  # read from a memory-mapped GGUF: copied out of it
        value = torch.tensor(value)
    quantize = quantization in QUANTIZABLE and _is_quantizable(name)
    if quantize and isinstance(value, torch.Tensor):
        value = QuantizedWeight.quantize(value.float(), quantization)
    if tuple(value.shape) != tuple(expected[name]):
        _wrong_shape(file, name, tuple(value.shape), expected)
    if isinstance(value, torch.Tensor):
        value = runtime.upload(value.to(dtype))
    set_parameter(model, name, value)


def _is_quantizable(name: str) -> bool:
    """The backbone's projections, embedding and head: what llama.cpp quantizes."""
    return ".engram." not in name and name.endswith(QUANTIZED_SUFFIXES)


def _wrong_shape(file: Path, name: str, shape: tuple[int, ...], expected) -> None:
    raise ModelLoadError(
        f"{file.name}: tensor {name} has shape {shape}, expected {tuple(expected[name])}"
    )


def _open(file: Path):  # -> safetensors handle
    try:
        return safe_open(file, framework="pt")
    except (SafetensorError, OSError) as err:
        raise ModelLoadError(f"{file}: not a readable safetensors file ({err})") from err


def set_parameter(model: nn.Module, name: str, value: Weight) -> None:
    module_name, _, leaf = name.rpartition(".")
    set_weight(model.get_submodule(module_name), leaf, value)


def place_on_device(model: nn.Module, runtime: DeviceRuntime) -> None:
    """Upload every real parameter and buffer not yet on the runtime's device (meta ones stay
    for the checks to name). Runs before projections are fused and weights tied, so no view
    is split from its base."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if not param.is_meta and param.device != runtime.device:
                setattr(module, name, nn.Parameter(runtime.upload(param.detach()),
                                                   requires_grad=False))  # fmt: skip
        for name, buffer in list(module.named_buffers(recurse=False)):
            if not buffer.is_meta and buffer.device != runtime.device:
                setattr(module, name, runtime.upload(buffer))
