"""A CLIP byte-level BPE tokenizer built locally (no hub access needed).

The vocabulary follows CLIP's layout: the 256 byte symbols, the same 256 with the
end-of-word marker ``</w>``, one entry per learned merge, then ``<|startoftext|>`` and
``<|endoftext|>``. Merges are learned here with plain BPE on a small built-in corpus, so
common words are single tokens and rarer ones split into several sub-tokens: exactly the
case the word ↔ token matching must handle.
"""

from __future__ import annotations

import collections
import json
from functools import lru_cache
from pathlib import Path

# Words the tiny vocabulary learns whole; anything else falls back to shorter pieces and bytes.
CORPUS = (
    "a an the of and or in on at to with is are was there this that what which where who how "
    "many color colour shape red green blue yellow black white orange purple brown pink gray "
    "circle square triangle star heart cross ring object objects left right top bottom middle "
    "above below next picture image photo shows show showing small large big little two three "
    "one four dog cat man woman person people car tree house sky water grass table chair "
    "sitting standing holding wearing playing street road building window door"
).split()


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


@lru_cache(maxsize=4)
def learn_merges(words: tuple[str, ...], num_merges: int) -> tuple[tuple[str, str], ...]:
    """Plain BPE: repeatedly merge the most frequent adjacent pair (ties broken by the pair)."""
    byte_chars = _bytes_to_unicode()
    sequences: collections.Counter[tuple[str, ...]] = collections.Counter()
    for word in words:
        symbols = [byte_chars[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        sequences[tuple(symbols)] += 1
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for symbols, count in sequences.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        merged: collections.Counter[tuple[str, ...]] = collections.Counter()
        for symbols, count in sequences.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] += count
        sequences = merged
    return tuple(merges)


def build_clip_tokenizer(num_merges: int = 400, model_max_length: int = 77):
    """A fast ``CLIPTokenizer`` with a small learned vocabulary (about 730 entries)."""
    from transformers import CLIPTokenizer

    vocab, merges = _vocab_and_merges(num_merges)
    return CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=model_max_length)


def save_clip_tokenizer(path: str | Path, num_merges: int = 400, model_max_length: int = 77) -> None:
    """Write the tokenizer to ``path``: ``tokenizer.json`` for the fast class, plus CLIP's own
    ``vocab.json`` and ``merges.txt`` so that any CLIP tokenizer class can load the folder."""
    path = Path(path)
    build_clip_tokenizer(num_merges, model_max_length).save_pretrained(path)
    vocab, merges = _vocab_and_merges(num_merges)
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{left} {right}" for left, right in merges]
    (path / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _vocab_and_merges(num_merges: int) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    byte_symbols = list(_bytes_to_unicode().values())
    merges = learn_merges(tuple(CORPUS), num_merges)
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(pair) for pair in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(dict.fromkeys(tokens))}, merges
