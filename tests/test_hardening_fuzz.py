"""Property tests (hypothesis, bounded): the tokenizer compression against keys derived
independently with Python's unicodedata, and the SSE framing of streamed chunks read back by
real SSE parsers."""

from __future__ import annotations

import json
import re
import unicodedata

import httpx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai._streaming import SSEDecoder
from test_server_support import sse_data
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from engram_serve.engram.compression import build_compression
from engram_serve.server import protocol as p
from engram_serve.server.sse import _sse

# -- compression ------------------------------------------------------------------------------

# The Unicode White_Space property (PropList.txt): what the tokenizers Strip normalizer strips.
# Python's str.strip() differs (it also strips U+001C..U+001F).
WHITE_SPACE = frozenset(
    "\t\n\v\f\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000"
    + "".join(map(chr, range(0x2000, 0x200B)))
)


def expected_key(text: str, raw_token: str) -> str:
    """A token's compression key, from the rules in engram/compression.py's docstring: the raw
    token when its text holds U+FFFD; else NFKC, NFD, marks dropped, lowercased character by
    character, runs of space/tab/CR/LF made one space, then stripped (a lone space stays);
    the text itself when nothing is left."""
    if "\ufffd" in text:
        return raw_token
    key = unicodedata.normalize("NFD", unicodedata.normalize("NFKC", text))
    key = "".join(c.lower() for c in key if not unicodedata.category(c).startswith("M"))
    key = re.sub(r"[ \t\r\n]+", " ", key)
    if key != " ":
        start, end = 0, len(key)
        while start < end and key[start] in WHITE_SPACE:
            start += 1
        while end > start and key[end - 1] in WHITE_SPACE:
            end -= 1
        key = key[start:end]
    return key or text


def expected_lookup(keys: list[str]) -> np.ndarray:
    """Equal keys share an id; ids are handed out 0, 1, ... in first-seen order."""
    ids: dict[str, int] = {}
    return np.array([ids.setdefault(k, len(ids)) for k in keys], dtype=np.int64)


def _check_dense_first_seen(lookup: np.ndarray) -> None:
    first_index = {}
    for i, cid in enumerate(lookup.tolist()):
        first_index.setdefault(cid, i)
    assert sorted(first_index) == list(range(len(first_index)))  # dense 0..K-1
    assert sorted(first_index, key=first_index.get) == list(range(len(first_index)))


# Characters whose Unicode data has been stable for many versions (the tokenizers crate and
# Python need not agree on newer ones): Latin with accents, combining marks, Greek, Cyrillic,
# compatibility forms NFKC folds (fullwidth, ligatures, circled, roman numerals, superscripts),
# Hangul syllables (NFD splits them), CJK, and whitespace of every kind.
RANGES = [(0x20, 0x7E), (0xA0, 0x17F), (0x300, 0x36F), (0x391, 0x3C9), (0x410, 0x44F),
          (0xFF01, 0xFF5E), (0xFB00, 0xFB06), (0x2460, 0x24E9), (0x2160, 0x217F),
          (0x2070, 0x2079), (0xAC00, 0xAC40), (0x4E00, 0x4E40), (0x2000, 0x200B)]  # fmt: skip
ALPHABET = st.one_of(
    st.sampled_from("\t\n\r\x0b\x0c\x1c\x1f\x85\u2028\u2029\u3000\ufffd"),
    *(st.integers(lo, hi).map(chr) for lo, hi in RANGES),
)
VARIANTS = [
    lambda s: s,
    str.upper,
    str.title,
    lambda s: " " + s,
    lambda s: "\t" + s + "\n",
    lambda s: unicodedata.normalize("NFD", s),
    lambda s: s + "\u0301",  # an acute accent
    lambda s: "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in s),  # fullwidth
]
WORDS = st.text(ALPHABET, min_size=1, max_size=6)


def _vocabularies(bases: list[str]) -> st.SearchStrategy[list[str]]:
    """Tokens: variants of a few base words (so keys collide) and unrelated words."""
    variant = st.builds(lambda b, v: VARIANTS[v](b), st.sampled_from(bases),
                        st.integers(0, len(VARIANTS) - 1))  # fmt: skip
    return st.lists(st.one_of(variant, WORDS), min_size=1, max_size=40, unique=True)


VOCABULARIES = st.lists(WORDS, min_size=1, max_size=6).flatmap(_vocabularies)


def word_level_tokenizer(vocabulary: list[str]) -> PreTrainedTokenizerFast:
    """A real tokenizer whose tokens are exactly `vocabulary` (decoding an id gives its token)."""
    model = models.WordLevel({t: i for i, t in enumerate(vocabulary)}, unk_token=vocabulary[0])
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(model))


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(VOCABULARIES)
def test_compression_matches_independent_keys(vocabulary):
    tokenizer = word_level_tokenizer(vocabulary)
    texts = tokenizer.backend_tokenizer.decode_batch(
        [[i] for i in range(len(vocabulary))], skip_special_tokens=False
    )
    assert texts == vocabulary  # the tokens come back verbatim: the keys below see them
    lookup = build_compression(tokenizer)
    keys = [expected_key(t, t) for t in vocabulary]
    np.testing.assert_array_equal(lookup, expected_lookup(keys))
    _check_dense_first_seen(lookup)


def test_compression_examples():
    """Hand-picked corners, with the keys the rules give."""
    cases = {
        "Café": "cafe", "CAFE\u0301": "cafe", " café\n": "cafe", "\uff23\uff41\uff46\uff45": "cafe",
        "ΑΣ": "ασ",  # per character: no final sigma
        " ": " ", "\t\n": " ", "\xa0": " ", "\u2028": "\u2028", "\x1c": "\x1c",
        "\ufb01": "fi", "\u2167": "viii", "a\ufffd": "a\ufffd",
    }  # fmt: skip
    for text, key in cases.items():
        assert expected_key(text, text) == key, text
    vocabulary = list(cases)
    lookup = build_compression(word_level_tokenizer(vocabulary))
    np.testing.assert_array_equal(lookup, expected_lookup(list(cases.values())))
    assert lookup[0] == lookup[1] == lookup[2] == lookup[3]


def test_compression_of_the_whole_smollm2_vocabulary(smollm2_hf_tokenizer):
    """Every SmolLM2 token (byte-level BPE: partial UTF-8 pieces decode to U+FFFD)."""
    tokenizer = smollm2_hf_tokenizer
    backend = tokenizer.backend_tokenizer
    vocab_len = len(tokenizer)
    texts = backend.decode_batch([[i] for i in range(vocab_len)], skip_special_tokens=False)
    keys = [expected_key(t, backend.id_to_token(i)) for i, t in enumerate(texts)]
    lookup = build_compression(tokenizer)
    np.testing.assert_array_equal(lookup, expected_lookup(keys))
    _check_dense_first_seen(lookup)
    assert 0.5 * vocab_len < lookup.max() + 1 < vocab_len  # it merges, and not everything


# -- SSE framing ------------------------------------------------------------------------------

TRICKY = ["\n", "\r\n", "\r", "\n\n", "data: ", "data: [DONE]\n\n", ":", "event: x\n", "id: 1",
          "\u2028", "\u2029", "\x85", "\x00", "\\", '"', "\ufeff", "é", "🙂", "\x1c"]  # fmt: skip
TEXTS = st.lists(st.one_of(st.text(max_size=8), st.sampled_from(TRICKY)), max_size=8).map("".join)


def _frames(texts: list[str]) -> tuple[bytes, list[tuple[str, str]]]:
    """The wire bytes of a stream of completion and chat chunks carrying `texts`, with
    (kind, text) of each chunk in order."""
    wire, sent = [], []
    for i, text in enumerate(texts):
        if i % 2:
            choice = p.ChatStreamChoice(index=0, delta=p.DeltaMessage(content=text))
            chunk = p.ChatCompletionChunk(id="c", created=0, model="m", choices=[choice])
            sent.append(("chat", text))
        else:
            chunk = p.CompletionResponse(
                id="x", model="m", choices=[p.CompletionChoice(index=0, text=text)]
            )
            sent.append(("completion", text))
        wire.append(_sse(chunk))
    wire.append("data: [DONE]\n\n")
    return "".join(wire).encode(), sent


def _received(payloads: list) -> list[tuple[str, str]]:
    out = []
    for event in payloads[:-1]:
        choice = event["choices"][0]
        if "delta" in choice:
            out.append(("chat", choice["delta"].get("content")))
        else:
            out.append(("completion", choice["text"]))
    return out


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(texts=st.lists(TEXTS, min_size=1, max_size=5), cuts=st.lists(st.integers(0, 10**6)))
def test_sse_frames_round_trip_through_real_parsers(texts, cuts):
    wire, sent = _frames(texts)
    # The network splits the bytes anywhere, even inside a UTF-8 character.
    bounds = sorted({0, len(wire), *(c % (len(wire) + 1) for c in cuts)})
    pieces = [wire[a:b] for a, b in zip(bounds, bounds[1:])]

    # The OpenAI client's parser (lines end at CR, LF or CRLF, as the SSE spec says).
    events = list(SSEDecoder().iter_bytes(iter(pieces)))
    assert [e.data for e in events][-1] == "[DONE]" and all(e.event is None for e in events)
    assert _received([json.loads(e.data) for e in events[:-1]] + ["[DONE]"]) == sent

    # httpx's iter_lines (str.splitlines rules: also U+2028, U+0085, ...), which many SSE
    # readers use: every frame must still be one `data:` line.
    response = httpx.Response(200, content=b"".join(pieces))
    assert _received(sse_data(list(response.iter_lines()))) == sent


@pytest.mark.parametrize("text", ["a\u2028b", "x\x85y", "\u2029"])
def test_sse_frames_hold_no_unicode_line_breaks(text):
    choice = p.CompletionChoice(index=0, text=text)
    frame = _sse(p.CompletionResponse(id="x", model="m", choices=[choice]))
    assert frame.endswith("\n\n") and len(frame[:-2].splitlines()) == 1
    assert json.loads(frame.removeprefix("data: "))["choices"][0]["text"] == text
