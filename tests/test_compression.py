from __future__ import annotations

import numpy as np

from engram_serve.engram.compression import build_compression, load_compression


def test_compression_merges_case_and_space_variants(smollm2_hf_tokenizer):
    tok = smollm2_hf_tokenizer
    lookup = build_compression(tok)
    the, cap_the, space_the = (tok.convert_tokens_to_ids(t) for t in ("the", "The", "Ġthe"))
    assert lookup[the] == lookup[cap_the] == lookup[space_the]
    assert lookup[tok.convert_tokens_to_ids("cat")] != lookup[the]
    # Ids are assigned in first-seen order: id 0 maps to 0 and every new key takes the next id.
    firsts = np.unique(lookup, return_index=True)[1]
    assert (np.diff(lookup[np.sort(firsts)]) == 1).all() and lookup[0] == 0


def test_load_compression_caches_by_tokenizer_content(smollm2_hf_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("ENGRAM_SERVE_CACHE", str(tmp_path))
    first = load_compression(smollm2_hf_tokenizer)
    cached = list((tmp_path / "compression").glob("*.npy"))
    assert len(cached) == 1
    np.testing.assert_array_equal(np.load(cached[0]), first)
    # A second load reads the file: overwrite it and see the overwritten values come back.
    np.save(cached[0], first[::-1].copy())
    np.testing.assert_array_equal(load_compression(smollm2_hf_tokenizer), first[::-1])
