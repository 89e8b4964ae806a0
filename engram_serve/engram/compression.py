"""Tokenizer compression: raw token id -> compressed id, exactly as the Engram reference builds it.

Tokens whose text differs only in case, accents, Unicode form or surrounding whitespace share one
compressed id (a 128k vocabulary shrinks by about a quarter). Rules, per raw id in order 0..V-1:
decode the id alone (special tokens kept, no space clean-up); if the text holds U+FFFD (a partial
UTF-8 byte) the key is the raw token string, else the normalised text (or the text itself when
normalising leaves nothing). Keys get compressed ids in first-seen order.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
from tokenizers import Regex, normalizers

from engram_serve.config import cache_dir

_SPACE_SENTINEL = "\ue000"  # keeps a token that is exactly one space from collapsing to ""


def _normalizer() -> normalizers.Normalizer:
    return normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.NFD(),
            normalizers.StripAccents(),
            normalizers.Lowercase(),
            normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
            normalizers.Replace(Regex(r"^ $"), _SPACE_SENTINEL),
            normalizers.Strip(),
            normalizers.Replace(_SPACE_SENTINEL, " "),
        ]
    )


def build_compression(tokenizer) -> np.ndarray:
    """Return `lookup` int64 `[V]`: raw id -> compressed id. `tokenizer` is a transformers
    tokenizer backed by a Rust `tokenizers` object (decoded without clean-up, as in training)."""
    backend = tokenizer.backend_tokenizer
    vocab_len = len(tokenizer)
    texts = backend.decode_batch([[i] for i in range(vocab_len)], skip_special_tokens=False)
    normalize = _normalizer().normalize_str
    key_to_id: dict[str, int] = {}
    lookup = np.empty(vocab_len, dtype=np.int64)
    for token_id, text in enumerate(texts):
        if "\ufffd" in text:
            key = backend.id_to_token(token_id)
        else:
            key = normalize(text) or text
        lookup[token_id] = key_to_id.setdefault(key, len(key_to_id))
    return lookup


def load_compression(tokenizer) -> np.ndarray:
    """`build_compression`, cached on disk under a key made of the tokenizer's full content."""
    content = tokenizer.backend_tokenizer.to_str().encode()
    key = hashlib.sha256(content + str(len(tokenizer)).encode()).hexdigest()[:24]
    path = cache_dir() / "compression" / f"{key}.npy"
    if path.exists():
        return np.load(path)
    lookup = build_compression(tokenizer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, lookup)
    os.replace(tmp, path)  # atomic: a concurrent reader sees the whole file or none
    return lookup


def num_compressed(lookup: np.ndarray) -> int:
    return int(lookup.max()) + 1
