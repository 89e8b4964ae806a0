"""What an Engram model is, as data, independent of serving.

    config.py        EngramConfig: the fields of engram.json (layers, n-gram orders, heads, table
                     heights, row width and dtype)
    compression.py   tokenizer compression: raw token id -> compressed id
    ngram_hash.py    the hash multipliers, the per-head primes (the table layout) and the hasher
                     that turns compressed ids into row ids
    tables.py        the on-disk format: engram.json, table files, module weights, the manifest,
                     verification, the FP8 (E4M3 rows, UE8M0 block scales) layout, memory-mapped
                     reads

The module's math (gate, short conv, value path) is a layer of the network and lives in
model/engram.py; this package imports neither the model nor anything that serves it.
"""
