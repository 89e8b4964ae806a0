"""Give a model directory fresh Engram memory (a retrofit): freshly initialised Engram modules
(model/engram.py) written with seeded random tables in the Engram format (engram/tables.py)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from engram_serve.engram.config import EngramConfig, TableDtype
from engram_serve.engram.tables import write_tables
from engram_serve.model.engram import build_engram, zero_value_path


def init_tables(
    model_dir: str | Path,
    config: EngramConfig,
    num_compressed: int,
    seed: int = 0,
    dtype: TableDtype | None = None,
    identity: bool = False,
    progress: bool = True,
    *,
    hidden_size: int | None = None,
    chunk_bytes: int = 64 << 20,
) -> dict[str, Any]:
    """Give `model_dir` fresh Engram memory: engram.json, seeded random tables, module weights
    and the manifest. Returns the manifest.

    `num_compressed` is the compressed vocabulary size of the model's tokenizer. `seed` seeds the
    table contents and the modules (config.seed seeds the hashing); `dtype` overrides
    config.table_dtype; `identity` zeroes each module's value path, so the model's outputs equal
    its backbone's until trained tables and modules replace these. `hidden_size` defaults to the
    directory's config.json.
    """
    model_dir = Path(model_dir)
    if dtype is not None:
        config = replace(config, table_dtype=dtype)
    modules = initial_weights(config, _hidden_size(model_dir, hidden_size), seed, identity)
    return write_tables(
        model_dir,
        config,
        num_compressed,
        modules,
        seed=seed,
        identity=identity,
        progress=progress,
        chunk_bytes=chunk_bytes,
    )


def initial_weights(
    config: EngramConfig, hidden_size: int, seed: int, identity: bool
) -> dict[str, torch.Tensor]:
    """Freshly initialised Engram modules (PyTorch default init, seeded per layer)."""
    out = {}
    with torch.random.fork_rng(devices=[]):
        for layer_id in config.layer_ids:
            torch.manual_seed(seed * 100_003 + layer_id)
            module = build_engram(config, hidden_size)
            if identity:
                zero_value_path(module)
            for name, t in module.state_dict().items():
                out[f"model.layers.{layer_id}.engram.{name}"] = t.detach().float().contiguous()
    return out


def _hidden_size(model_dir: Path, hidden_size: int | None) -> int:
    if hidden_size is not None:
        return hidden_size
    config_path = model_dir / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} is missing; pass hidden_size explicitly")
    return int(json.loads(config_path.read_text())["hidden_size"])
