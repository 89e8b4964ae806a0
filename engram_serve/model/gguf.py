"""GGUF file -> a Hugging Face-style directory (config.json, model.safetensors, tokenizer files).

llama.cpp names tensors its own way (`blk.3.attn_q.weight`), stores them quantized, and permutes
the rows of the Q and K projections so that its RoPE rotates adjacent pairs (x[2i], x[2i+1])
where Hugging Face Llama rotates halves (x[i], x[i + d/2]). Converting back means: rename,
dequantize to float32, and undo that row permutation. The result loads like any HF checkpoint.
`read_gguf_weights` instead keeps block-quantized weights in their formats (un-permuted all the
same) for `quantization="gguf"`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from engram_serve.engram.tables import safetensors_header
from engram_serve.kernels.cpu_quant import QuantizedWeight

SUPPORTED_ARCHITECTURES = ("llama",)
# The GGUF itself, kept beside the float32 conversion: `quantization="gguf"` loads its
# block-quantized weights as they are.
GGUF_WEIGHTS = "model.gguf"

# llama.cpp tensor name -> HF name; `{i}` is the layer index.
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"^(\w+)\.(weight|bias)$")


def hf_tensor_name(gguf_name: str) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; unknown names raise."""
    if m := _LAYER_RE.match(gguf_name):
        layer, part, kind = m.groups()
        if part in _LAYER_NAMES:
            return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"
    elif (m := _GLOBAL_RE.match(gguf_name)) and m.group(1) in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[m.group(1)]}.{m.group(2)}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face Llama equivalent")


def unpermute_qk(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order for `num_heads` heads.

    Within a head of width d, llama.cpp row 2i + j (j in {0, 1}) holds HF row j * d/2 + i: the two
    halves that HF's RoPE rotates together are interleaved. Works for weights `[out, in]` and
    biases `[out]`.
    """
    out = w.shape[0]
    if out % (2 * num_heads):
        raise ValueError(f"{out} rows do not split into {num_heads} heads of even width")
    half = out // num_heads // 2
    return w.reshape(num_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.get_field(key)
    return default if field is None else field.contents()


def _f32(value: float) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


def read_hf_config(reader) -> dict[str, Any]:
    """A `config.json` for LlamaForCausalLM from the GGUF's `llama.*` metadata."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported (supported: {SUPPORTED_ARCHITECTURES})"
        )
    names = {t.name for t in reader.tensors}
    num_heads = int(_field(reader, f"{arch}.attention.head_count"))
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    vocab = _field(reader, f"{arch}.vocab_size")
    if vocab is None:  # older files: the embedding's height
        vocab = next(int(t.shape[-1]) for t in reader.tensors if t.name == "token_embd.weight")
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, f"{arch}.block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(_field(reader, f"{arch}.attention.head_count_kv", num_heads)),
        "head_dim": int(_field(reader, f"{arch}.attention.key_length", hidden // num_heads)),
        "hidden_act": "silu",
        "rms_norm_eps": _f32(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _f32(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    config["rope_scaling"] = _rope_scaling(reader, arch)
    for key in ("bos", "eos", "padding"):
        token_id = _field(reader, f"tokenizer.ggml.{key}_token_id")
        if token_id is not None:
            config[f"{key.replace('padding', 'pad')}_token_id"] = int(token_id)
    return config


def _rope_scaling(reader, arch: str) -> dict[str, Any] | None:
    kind = _field(reader, f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        if any(t.name == "rope_freqs.weight" for t in reader.tensors):
            raise ValueError("GGUF carries rope_freqs.weight (Llama 3 RoPE scaling): unsupported")
        return None
    if kind == "linear":
        factor = _f32(_field(reader, f"{arch}.rope.scaling.factor"))
        return {"rope_type": "linear", "factor": factor}
    raise ValueError(f"GGUF RoPE scaling {kind!r} is not supported (only linear)")


def _generation_config(config: dict[str, Any], reader) -> dict[str, Any]:
    eos = [config["eos_token_id"]] if "eos_token_id" in config else []
    eot = _field(reader, "tokenizer.ggml.eot_token_id")  # chat models end turns with it
    if eot is not None and int(eot) not in eos:
        eos.append(int(eot))
    out: dict[str, Any] = {"_from_model_config": False}
    if "bos_token_id" in config:
        out["bos_token_id"] = config["bos_token_id"]
    if eos:
        out["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    return out


def _dequantized(tensor, num_heads: int, num_kv_heads: int) -> np.ndarray:
    """One GGUF tensor as float32 in HF layout (`[out, in]`, Q/K rows un-permuted)."""
    from gguf.quants import dequantize

    w = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
    w = w.reshape([int(d) for d in reversed(tensor.shape)])  # GGUF lists dims innermost first
    if ".attn_q." in tensor.name:
        w = unpermute_qk(w, num_heads)
    elif ".attn_k." in tensor.name:
        w = unpermute_qk(w, num_kv_heads)
    return np.ascontiguousarray(w)


DENSE_TYPES = ("F32", "F16", "BF16")


def gguf_tensor_names(gguf_path: Path) -> list[str]:
    """The Hugging Face names of a GGUF's tensors."""
    import gguf

    return [hf_tensor_name(t.name) for t in gguf.GGUFReader(gguf_path).tensors]


def read_gguf_weights(
    gguf_path: Path, num_heads: int, num_kv_heads: int
) -> Iterator[tuple[str, np.ndarray | QuantizedWeight]]:
    """(Hugging Face name, weight) for each tensor of a GGUF, in HF layout (Q/K rows
    un-permuted): float tensors as float32 arrays, block-quantized ones kept in their format
    (kernels/cpu_quant.py), memory-mapped blocks copied once into the kernels' layout."""
    import gguf

    heads = {"attn_q": num_heads, "attn_k": num_kv_heads}
    for tensor in gguf.GGUFReader(gguf_path).tensors:
        name, kind = hf_tensor_name(tensor.name), tensor.tensor_type.name
        shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dims innermost first
        part = tensor.name.split(".")[-2]
        if kind in DENSE_TYPES:
            yield name, _dequantized(tensor, num_heads, num_kv_heads)
            continue
        if len(shape) != 2:
            raise ValueError(f"GGUF tensor {tensor.name}: a {kind} tensor of shape {shape}")
        weight = QuantizedWeight.from_gguf(tensor.data, kind, shape)
        if part in heads:
            weight = weight.permute_rows(unpermute_qk(np.arange(shape[0]), heads[part]))
        yield name, weight


def _write_weights(reader, config: dict[str, Any], path: Path, progress: bool) -> None:
    """Stream `model.safetensors`: header first, then one tensor at a time, so memory holds at
    most one dequantized tensor besides the memory-mapped GGUF."""
    entries = [
        (hf_tensor_name(t.name), "float32", tuple(int(d) for d in reversed(t.shape)))
        for t in reader.tensors
    ]
    header, offsets, _ = safetensors_header(entries, metadata={"format": "pt"})
    with open(path, "wb") as f:
        f.write(header)
        bar = tqdm(reader.tensors, desc="Dequantizing GGUF", unit="tensor", disable=not progress)
        for tensor, (name, _, shape) in zip(bar, entries, strict=True):
            w = _dequantized(tensor, config["num_attention_heads"], config["num_key_value_heads"])
            if w.shape != shape:
                raise ValueError(f"{tensor.name}: dequantized to {w.shape}, expected {shape}")
            assert f.tell() == offsets[name]
            f.write(memoryview(w).cast("B"))


def _write_tokenizer(gguf_path: Path, out_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer.save_pretrained(str(out_dir))


def convert_gguf(
    gguf_path: str | Path, out_dir: str | Path, progress: bool = True, overwrite: bool = False
) -> Path:
    """Convert a Llama-family GGUF into a Hugging Face directory at `out_dir` and return it.

    Writes config.json, model.safetensors (float32), generation_config.json, the GGUF itself
    (model.gguf, hard-linked where it can be) and, when the GGUF carries a tokenizer, the
    tokenizer files (with its chat template). Atomic: everything is built in a hidden sibling
    directory and renamed into place, so `out_dir` is either absent or complete. An existing
    `out_dir` raises FileExistsError unless `overwrite`.
    """
    import gguf

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass overwrite=True to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        reader = gguf.GGUFReader(gguf_path)
        config = read_hf_config(reader)
        generation = _generation_config(config, reader)
        has_tokenizer = reader.get_field("tokenizer.ggml.model") is not None
        _write_weights(reader, config, tmp / "model.safetensors", progress)
        del reader  # release the memory map before the tokenizer reads the file again
        _link_or_copy(gguf_path, tmp / GGUF_WEIGHTS)
        if has_tokenizer:
            _write_tokenizer(gguf_path, tmp)
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "generation_config.json", generation)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or no hard links there
        shutil.copyfile(src, dst)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename `src` to `dst`; an existing `dst` is moved aside first and removed after."""
    if not dst.exists():
        os.rename(src, dst)
        return
    trash = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(dst, trash)
    os.rename(src, dst)
    shutil.rmtree(trash, ignore_errors=True)
