"""Tokenizer and incremental detokenization, with the real SmolLM2 tokenizer (byte-level BPE) and
a small SentencePiece-style one (metaspace + byte fallback, the Llama-2 family's kind)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engram_serve.engine.tokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer, Tokenizer
from engram_serve.model.default_model import default_model_dir

SMOLLM2_VOCAB = 49152
# Text mixing ASCII, accents, CJK and emoji (4-byte UTF-8, split across byte-level tokens).
ALPHABET = st.sampled_from(list("ab zé\nü中文字😀🎉👍🏽ñ.,!") + ["\u200d", "🀄"])
TEXT = st.text(ALPHABET, max_size=40)
SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def smol() -> Tokenizer:
    return Tokenizer(default_model_dir(progress=False))


@pytest.fixture(scope="module")
def sentencepiece_dir(tmp_path_factory):
    """A tiny Llama-2-style tokenizer: '▁' for spaces, <0xNN> byte fallback, and a decoder that
    drops the leading space of the first token."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab |= {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for piece in ["▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "▁w", "el", "ll", "中", "é"]:
        vocab[piece] = len(vocab)
    merges = [("▁", "h"), ("▁", "w"), ("e", "l"), ("l", "l")]
    raw = RawTokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    raw.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    raw.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
         decoders.Strip(" ", 1, 0)]
    )  # fmt: skip
    path = tmp_path_factory.mktemp("sp")
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    wrapped.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sp(sentencepiece_dir) -> Tokenizer:
    return Tokenizer(sentencepiece_dir)


def stream(tok: Tokenizer, ids: list[int], prompt_ids=None, **kwargs) -> tuple[list[str], str]:
    """(each add()'s delta, flush())."""
    detok = IncrementalDetokenizer(tok, prompt_ids, **kwargs)
    deltas = [detok.add(i) for i in ids]
    tail = detok.flush()
    assert detok.text == "".join(deltas) + tail
    return deltas, tail


# ------------------------------------------------------------------ Tokenizer


def test_basics(smol):
    # SmolLM2-Instruct ends turns with <|im_end|>, id 2 (its published generation config).
    assert smol.eos_token_ids == (2,)
    assert smol.decode([2], skip_special_tokens=False) == "<|im_end|>"
    assert smol.vocab_size == len(smol) == SMOLLM2_VOCAB
    text = "Engram tables: 中文, émigré 😀!"
    ids = smol.encode(text)
    assert all(isinstance(i, int) for i in ids)
    assert smol.decode(ids) == text


def test_chat_template(smol):
    messages = [{"role": "user", "content": "Hi there"}]
    ids = smol.apply_chat_template(messages)
    text = smol.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\n")  # SmolLM2's template adds a system turn
    assert text.endswith("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
    assert text.count("<|im_start|>") == 3  # nothing added on top of the template
    assert ids == smol.encode(smol.render_chat(messages), add_special_tokens=False)
    closed = smol.decode(smol.apply_chat_template(messages, add_generation_prompt=False), False)
    assert closed.endswith("Hi there<|im_end|>\n")


def test_no_chat_template(sp):
    assert not sp.has_chat_template
    with pytest.raises(ValueError, match="no chat template"):
        sp.apply_chat_template([{"role": "user", "content": "hi"}])


# ------------------------------------------------------------------ incremental detokenization


@SETTINGS
@given(ids=st.lists(st.integers(0, SMOLLM2_VOCAB - 1), max_size=40), skip=st.booleans())
def test_random_ids_match_whole_decode(smol, ids, skip):
    """Any token sequence, even one that is not valid UTF-8 (stray byte tokens)."""
    deltas, tail = stream(smol, ids, skip_special_tokens=skip)
    assert "".join(deltas) + tail == smol.decode(ids, skip_special_tokens=skip)


@SETTINGS
@given(text=TEXT)
def test_text_streams_whole_characters(smol, text):
    ids = smol.encode(text, add_special_tokens=False)
    deltas, tail = stream(smol, ids)
    assert "".join(deltas) == text and tail == ""
    assert not any(REPLACEMENT_CHAR in d for d in deltas)  # no partial character ever leaks


@SETTINGS
@given(text=TEXT, cut=st.integers(0, 100), noise=st.lists(st.integers(0, SMOLLM2_VOCAB - 1)))
def test_mixed_sequences(smol, text, cut, noise):
    """Valid text cut mid-character and followed by arbitrary tokens."""
    ids = smol.encode(text, add_special_tokens=False)
    ids = ids[: cut % (len(ids) + 1)] + noise
    deltas, tail = stream(smol, ids)
    assert "".join(deltas) + tail == smol.decode(ids)


@SETTINGS
@given(prompt=TEXT, output=TEXT)
def test_with_prompt_context(smol, prompt, output):
    prompt_ids = smol.encode(prompt, add_special_tokens=False)
    out_ids = smol.encode(output, add_special_tokens=False)
    deltas, tail = stream(smol, out_ids, prompt_ids)
    whole = smol.decode(prompt_ids + out_ids)
    assert "".join(deltas) + tail == whole[len(smol.decode(prompt_ids)) :]


def test_emoji_held_until_complete(smol):
    ids = smol.encode("a😀", add_special_tokens=False)
    deltas, tail = stream(smol, ids)
    assert [d for d in deltas if d] == ["a", "😀"] or [d for d in deltas if d] == ["a😀"]
    assert deltas[-1] != "" and tail == ""
    # the emoji's bytes span several tokens: nothing is emitted before the last one
    partial = smol.encode("😀", add_special_tokens=False)
    assert len(partial) > 1
    deltas, tail = stream(smol, partial[:-1])
    assert deltas == [""] * (len(partial) - 1)
    assert tail == smol.decode(partial[:-1]) and REPLACEMENT_CHAR in tail


@SETTINGS
@given(text=st.text(st.sampled_from(list("hello wrd中é😀 ")), max_size=30))
def test_sentencepiece_style(sp, text):
    ids = sp.encode(text, add_special_tokens=False)
    deltas, tail = stream(sp, ids)
    assert "".join(deltas) + tail == sp.decode(ids)
    assert not any(REPLACEMENT_CHAR in d for d in deltas)


def test_sentencepiece_leading_space_uses_prompt(sp):
    """'▁world' alone decodes to 'world'; after a prompt it must stream as ' world'."""
    prompt = sp.encode("hello", add_special_tokens=False)
    out = sp.encode("world", add_special_tokens=False)
    assert sp.decode(out) == "world"
    deltas, tail = stream(sp, out, prompt)
    assert "".join(deltas) + tail == " world"
    deltas, tail = stream(sp, out)  # no prompt: the first token's space is dropped, as decode
    assert "".join(deltas) + tail == "world"
