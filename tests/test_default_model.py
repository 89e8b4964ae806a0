"""The embedded default model against Hugging Face transformers reading the same GGUF.

Transformers dequantizes the packaged SmolLM2 GGUF on its own (and undoes llama.cpp's Q/K row
order on its own); our converted directory, loaded by our loader and run by our model, must
give the same weights, the same greedy continuations and the same logits. One model of each
is loaded per module.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from helpers import PagedRun
from safetensors import safe_open
from safetensors.torch import load_file

from engram_serve.engine.tokenizer import Tokenizer
from engram_serve.engram.compression import load_compression
from engram_serve.engram.ngram_hash import NgramHasher
from engram_serve.engram.tables import (
    ENGRAM_JSON,
    MODULES_FILE,
    open_table,
    read_engram_config,
    verify_tables,
)
from engram_serve.model.default_model import (
    DEFAULT_ENGRAM,
    default_model_dir,
    packaged_gguf_path,
)
from engram_serve.model.loader import load_model

NEW_TOKENS = 24
LONG_TOKENS = 400
LOGIT_ATOL = 1e-3
LONG_TEXT = " ".join(
    f"Entry {i}: the {c} {a} crossed {i + 3} rivers before noon."
    for i, (c, a) in enumerate(
        zip(
            ["red", "blue", "green", "amber", "silver"] * 8,
            ["fox", "heron", "otter", "lynx", "moth", "crane", "badger", "seal"] * 5,
            strict=True,
        )
    )
)


@pytest.fixture(scope="module")
def model_dir():
    return default_model_dir(progress=False)


@pytest.fixture(scope="module")
def tok(model_dir):
    return Tokenizer(model_dir)


@pytest.fixture(scope="module")
def reference():
    """transformers' own GGUF loading of the packaged file."""
    from transformers import AutoModelForCausalLM

    path = packaged_gguf_path()
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()


@pytest.fixture(scope="module")
def ours(model_dir):
    return load_model(model_dir)


CASES = ("fact", "code", "chat", "unicode", "long")


def prompts(tok: Tokenizer) -> list[list[int]]:
    chat = [{"role": "user", "content": "Give me three tips for staying healthy."}]
    by_case = {
        "fact": tok.encode("The capital of France is"),
        "code": tok.encode("def fibonacci(n):\n    "),
        "chat": tok.apply_chat_template(chat),
        "unicode": tok.encode("Translate to French: I love programming 😀 中文 émigré"),
        "long": tok.encode(LONG_TEXT)[:LONG_TOKENS],
    }
    return [by_case[c] for c in CASES]


def reference_logits(model, sequence: list[int]) -> torch.Tensor:  # [len(sequence), vocab]
    with torch.no_grad():
        return model(input_ids=torch.tensor([sequence])).logits[0].float()


def greedy_ours(
    model, prompt_list: list[list[int]], rows=None, new_tokens: int = NEW_TOKENS
) -> tuple[list[list[int]], torch.Tensor]:
    """Our paged forward, as the engine runs it: every prompt in one packed prefill, then all
    sequences decode together, one token each per step. Returns each sequence's tokens and
    logits `[S, new_tokens, vocab]`."""
    sequences = [p + [0] * new_tokens for p in prompt_list]  # placeholders, overwritten first
    make_rows = rows.for_sequences(sequences) if rows is not None else None
    run = PagedRun(model, model.config, sequences, block_size=16, make_rows=make_rows)
    run.sequences = sequences  # share the lists: generated tokens land where the run reads

    def step(num_new: dict[int, int]) -> torch.Tensor:  # [S, vocab] at each sequence's end
        batch = run.build_batch(num_new)
        batch.logits_indices = batch.attn.query_start_loc[1:] - 1
        for s, n in num_new.items():
            run.done[s] += n
        return model(batch)

    last = step({s: len(p) for s, p in enumerate(prompt_list)})
    tokens, logits = [[] for _ in sequences], []
    for i in range(new_tokens):
        logits.append(last)
        for s, p in enumerate(prompt_list):
            tokens[s].append(int(last[s].argmax()))
            sequences[s][len(p) + i] = tokens[s][-1]
        if i + 1 < new_tokens:
            last = step(dict.fromkeys(range(len(sequences)), 1))
    return tokens, torch.stack(logits, 1)


@pytest.fixture(scope="module")
def generated(tok, ours):
    return greedy_ours(ours, prompts(tok))


def test_default_dir_layout(model_dir, tok):
    started = time.perf_counter()
    assert default_model_dir(progress=False) == model_dir  # cached: no rebuild
    assert time.perf_counter() - started < 2.0
    assert read_engram_config(model_dir) == DEFAULT_ENGRAM
    raw = json.loads((model_dir / ENGRAM_JSON).read_text())
    assert raw["variant"] == "v41" and raw["layer_ids"] == [1, 14] and raw["head_dim"] == 32
    manifest = verify_tables(model_dir, full=True)
    assert manifest["identity"] is True
    # the tokenizer's compressed vocabulary: the golden value of the reference rule
    assert manifest["num_compressed"] == 32873
    assert len(tok) == 49152


def test_converted_weights_equal_transformers(model_dir, reference):
    """Exact equality: both dequantize the same bytes; Q/K un-permuted the same way."""
    ref = reference.state_dict()
    with safe_open(model_dir / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
        assert names == set(ref) - {"lm_head.weight"}  # tied to the embedding
        for name in names:
            assert torch.equal(f.get_tensor(name), ref[name]), name


@pytest.mark.parametrize("case", range(len(CASES)), ids=CASES)
def test_greedy_matches_transformers(case, tok, reference, generated):
    prompt = prompts(tok)[case]
    if CASES[case] == "long":
        assert len(prompt) == LONG_TOKENS
    got_tokens, got_logits = generated[0][case], generated[1][case]
    # transformers' logits at every position of the sequence we generated: our tokens are
    # its greedy continuation iff each is the argmax of its logits at the position before.
    want = reference_logits(reference, prompt + got_tokens)[len(prompt) - 1 : -1]
    want_tokens = want.argmax(-1).tolist()
    assert got_tokens == want_tokens, (tok.decode(got_tokens), tok.decode(want_tokens))
    torch.testing.assert_close(got_logits, want, atol=LOGIT_ATOL, rtol=0)


class TableRows:
    """Engram rows read from the table files for the positions a step runs. Rows are hashed
    from the sequence as it stands then (generated tokens included)."""

    def __init__(self, model_dir, tok):
        self.hasher = NgramHasher(DEFAULT_ENGRAM, load_compression(tok.hf_tokenizer))
        self.tables = {layer: open_table(model_dir, layer) for layer in DEFAULT_ENGRAM.layer_ids}

    def for_sequences(self, sequences: list[list[int]]):
        def make_rows(where):  # where: the step's (sequence, position) pairs, in batch order
            rows = {layer: [] for layer in DEFAULT_ENGRAM.layer_ids}
            for s, p in where:
                ids = self.hasher.compress(np.array(sequences[s][: p + 1]))
                lookback = self.hasher.lookback(np.zeros(0, np.int64))[None]
                row_ids = self.hasher.row_ids(ids, np.array([0, len(ids)]), lookback)[:, -1]
                for i, layer in enumerate(DEFAULT_ENGRAM.layer_ids):
                    rows[layer].append(self.tables[layer].gather(row_ids[i]))  # [(N-1)*H, W]
            return _Handle({layer: torch.stack(r) for layer, r in rows.items()})

        return make_rows


class _Handle:
    def __init__(self, rows):
        self.rows = rows

    def wait(self, layer_id):
        return self.rows[layer_id]


def test_engram_retrofit_is_identity(model_dir, tok, ours):
    """With its tables and modules loaded, the default model's logits equal the base model's;
    giving the value path weights makes them differ, so the rows really flow through."""
    model = load_model(model_dir, engram_config=DEFAULT_ENGRAM)
    weights = load_file(model_dir / MODULES_FILE)
    for layer_id in DEFAULT_ENGRAM.layer_ids:
        prefix = f"model.layers.{layer_id}.engram."
        module = model.model.layers[layer_id].engram
        module.load_state_dict({k[len(prefix) :]: v for k, v in weights.items() if prefix in k})
    prompt_list = [prompts(tok)[CASES.index(c)] for c in ("fact", "code", "unicode")]
    rows = TableRows(model_dir, tok)
    _, base_logits = greedy_ours(ours, prompt_list, new_tokens=4)
    _, logits = greedy_ours(model, prompt_list, rows, new_tokens=4)
    assert torch.equal(logits, base_logits)

    wkv = model.model.layers[1].engram.wkv.weight
    with torch.no_grad():
        wkv[model.config.hidden_size :] = torch.randn_like(wkv[model.config.hidden_size :])
    _, changed = greedy_ours(model, prompt_list, rows, new_tokens=1)
    assert (changed[:, 0] - base_logits[:, 0]).abs().amax(-1).min() > 1e-2


def test_damaged_cache_is_not_reused(model_dir, tmp_path, capsys):
    """A cached directory whose table was truncated is not handed out (it would be rebuilt)."""
    from engram_serve.model.default_model import _is_ready

    copy = tmp_path / "copy"
    copy.mkdir()
    for item in model_dir.iterdir():
        if item.name != "engram_tables":
            (copy / item.name).symlink_to(item)
    (copy / "engram_tables").mkdir()
    for item in (model_dir / "engram_tables").iterdir():
        (copy / "engram_tables" / item.name).symlink_to(item)
    assert _is_ready(copy)
    (copy / "engram_tables/layer_14.safetensors").unlink()
    (copy / "engram_tables/layer_14.safetensors").write_bytes(b"\0" * 4096)
    assert not _is_ready(copy)
    assert "layer_14.safetensors: truncated" in capsys.readouterr().err
