"""Structured outputs: grammars compiled by xgrammar, and the token bitmask that enforces them.

A request whose SamplingParams carry `structured_outputs` gets its own GrammarMatcher when it is
added (`Request.grammar`). Each step the sampler asks the matcher of every constrained request
in the batch which tokens may come next, as rows of ONE host bitmask `[S, ceil(V/32)]` int32 (a
bit per token, 1: allowed; rows of unconstrained requests allow every token), and masks the
logits with it before anything else (penalties, min_tokens, top-k, ...): a forbidden token keeps
probability 0 whatever follows. A batch with no constrained request builds no bitmask at all.
After sampling, the engine advances each matcher by the sampled token and finishes the request
(reason "stop") once the matcher has terminated. The tokenizer's EOS ids are the grammar's stop
tokens, so EOS is allowed exactly where the grammar may end, and taking it terminates it.

Compiling happens off the engine thread. The server compiles in a worker thread
(`AsyncEngine.compile_grammar`) before it hands the request over, so `Engine.add_request` finds
the grammar in xgrammar's cache (a hit takes ~20 us); the offline API compiles in `add_request`,
on the caller's thread, which is where its steps run anyway. The cache is xgrammar's own,
bounded in bytes (GRAMMAR_CACHE_BYTES). Were a grammar evicted between the server's compile and
the add (more than the cache holds compiled in that instant), the add would compile it again:
slower, still correct.

Preemption by recompute stays consistent by construction: a matcher is advanced only by sampled
tokens, and a recompute samples only the token after the prompt and the output so far, so the
preempted request's matcher is already where the recompute leaves it.
"""

from __future__ import annotations

import json
import re
import threading
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    import xgrammar as xgr

from engram_serve.engine.request import Request, StructuredOutputs
from engram_serve.engine.tokenizer import Tokenizer

# The test schema (three fields, an enum) compiles to ~0.1 MB for SmolLM2's 49,152 tokens, so
# this holds about a thousand such grammars.
GRAMMAR_CACHE_BYTES = 128 << 20
JSON_OBJECT_SCHEMA = '{"type": "object"}'  # OpenAI's json_object: any object, not any value


def _xgrammar() -> ModuleType:
    """xgrammar, imported by the first constrained request (in the server, on its compile
    thread): a process that never constrains an output does not hold its 44 MiB (resident
    memory of the import, with the transformers modules it pulls in)."""
    import xgrammar

    return xgrammar


def _compile(compiler: xgr.GrammarCompiler, spec: StructuredOutputs) -> xgr.CompiledGrammar:
    if spec.kind == "json":
        return compiler.compile_json_schema(spec.json, any_whitespace=spec.any_whitespace)
    if spec.kind == "json_object":
        return compiler.compile_json_schema(JSON_OBJECT_SCHEMA, any_whitespace=spec.any_whitespace)
    if spec.kind == "regex":
        return compiler.compile_regex(spec.regex)
    if spec.kind == "choice":  # one alternative per choice; JSON's string escapes are EBNF's
        return compiler.compile_grammar("root ::= " + " | ".join(map(json.dumps, spec.choice)))
    return compiler.compile_grammar(spec.grammar)


_WHAT = {
    "json": "invalid JSON schema",
    "json_object": "the JSON object grammar failed",
    "regex": "invalid regex",
    "choice": "invalid choice",
    "grammar": "invalid grammar",
}
# xgrammar's messages start with a time stamp, a C++ source location and the failed check.
_LOG_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*(Check failed: \(.*?\) is false:\s*)?")


class GrammarCompiler:
    """Compiles StructuredOutputs for one model's tokenizer. Thread-safe: the server compiles in
    worker threads while the engine thread makes matchers."""

    def __init__(
        self, tokenizer: Tokenizer, vocab_size: int, cache_bytes: int = GRAMMAR_CACHE_BYTES
    ) -> None:
        """`vocab_size`: the width of the model's logits (it may exceed the tokenizer's)."""
        self.tokenizer, self.vocab_size, self.cache_bytes = tokenizer, vocab_size, cache_bytes
        self._compiler: xgr.GrammarCompiler | None = None
        self._lock = threading.Lock()

    def compile(self, spec: StructuredOutputs) -> xgr.CompiledGrammar:
        """The grammar of `spec` (cached). Raises ValueError naming what does not compile."""
        try:
            return _compile(self._xgrammar_compiler(), spec)
        except (RuntimeError, ValueError) as e:  # xgrammar's for a bad schema, regex, grammar
            reason = _LOG_PREFIX.sub("", str(e).strip().splitlines()[0])
            raise ValueError(f"{_WHAT[spec.kind]}: {reason}") from e

    def matcher(self, spec: StructuredOutputs) -> xgr.GrammarMatcher:
        """A fresh matcher at the start of `spec`'s grammar."""
        return _xgrammar().GrammarMatcher(self.compile(spec))

    def _xgrammar_compiler(self) -> xgr.GrammarCompiler:
        """Made at the first compile (reading the vocabulary takes ~0.2 s for 49,152 tokens), so
        an engine that never sees a constrained request never pays for it."""
        with self._lock:
            if self._compiler is None:
                xgr = _xgrammar()
                info = xgr.TokenizerInfo.from_huggingface(
                    self.tokenizer.hf_tokenizer,
                    vocab_size=self.vocab_size,
                    stop_token_ids=list(self.tokenizer.eos_token_ids),
                )
                self._compiler = xgr.GrammarCompiler(info, cache_limit_bytes=self.cache_bytes)
            return self._compiler


def grammar_bitmask(requests: list[Request], rows: list[int], vocab_size: int) -> np.ndarray:
    """[S, ceil(V/32)] int32 on the host: each of `rows` allows the tokens its request's grammar
    allows next; the other rows allow every token."""
    # NumPy, not torch (xgrammar takes either through DLPack): host arrays stay host arrays
    # even where torch makes fake device tensors (tests/fake_cuda.py).
    bitmask = np.full(_xgrammar().get_bitmask_shape(len(requests), vocab_size), -1, np.int32)
    for row in rows:
        requests[row].grammar.fill_next_token_bitmask(bitmask, row)
    return bitmask


def apply_token_bitmask(
    logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]
) -> torch.Tensor:
    """logits [S, V] with -inf where the bitmask [S, ceil(V/32)] has a 0 bit. `rows`: the
    constrained rows (the others are all ones). On CPU xgrammar's kernel masks those rows of a
    copy in place; on a device the torch twin masks every row, without reading anything back."""
    if logits.device.type != "cpu":
        return apply_token_bitmask_torch(logits, bitmask)
    logits = logits.clone()  # the caller's tensor stays as it was
    _xgrammar().apply_token_bitmask_inplace(
        logits, bitmask, vocab_size=logits.shape[1], indices=rows
    )
    return logits


def apply_token_bitmask_torch(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """The pure-torch twin of xgrammar's kernel: bit j of word w is token 32 w + j."""
    shifts = torch.arange(32, device=logits.device, dtype=torch.int32)
    allowed = ((bitmask[:, :, None] >> shifts) & 1).flatten(1)[:, : logits.shape[1]]  # [S, V]
    return logits.masked_fill(allowed == 0, float("-inf"))


def advance(request: Request, token_id: int) -> bool:
    """Move the request's grammar past its sampled token; True once the grammar has ended. The
    bitmask allowed the token, so a refusal is a bug, not a bad request."""
    if not request.grammar.accept_token(token_id):
        raise RuntimeError(
            f"request {request.request_id}: its grammar refused token {token_id}, which its "
            "bitmask allowed"
        )
    return request.grammar.is_terminated()
