"""A small CLIP-style byte-level BPE vocabulary built in code (no hub download).

Layout follows CLIP's: 256 byte symbols, the same with the end-of-word marker `</w>`,
then one merge chain per listed word, then the two special tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"

# Words the tiny and reference models see in prompts; any other text still tokenizes byte by byte.
WORDS = [
    "a",
    "an",
    "the",
    "of",
    "on",
    "at",
    "in",
    "with",
    "and",
    "small",
    "large",
    "big",
    "medium",
    "red",
    "green",
    "blue",
    "yellow",
    "orange",
    "purple",
    "white",
    "black",
    "gray",
    "grey",
    "pink",
    "brown",
    "cyan",
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "diamond",
    "top",
    "bottom",
    "left",
    "right",
    "center",
    "middle",
    "background",
    "photo",
    "picture",
    "cat",
    "dog",
    "house",
    "tree",
]


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2 byte->printable character table, so every byte has a visible symbol."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_vocab(words: tuple[str, ...] = WORDS) -> tuple[dict[str, int], list[str]]:
    """Return (token -> id, merges) for a byte-level BPE that spells `words` as single tokens."""
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    merges: list[str] = []
    seen = set(tokens)
    for word in words:
        parts = [*word[:-1], word[-1] + "</w>"]
        # Merge right to left; each merge's result is a new vocabulary entry.
        while len(parts) > 1:
            left, right = parts[-2], parts[-1]
            merged = left + right
            if merged not in seen:
                merges.append(f"{left} {right}")
                tokens.append(merged)
                seen.add(merged)
            parts = [*parts[:-2], merged]
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_vocab_files(folder: Path) -> tuple[Path, Path]:
    """Write vocab.json and merges.txt as real SD1.x folders keep them."""
    vocab, merges = build_vocab()
    folder.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False))
    merges_path.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab_path, merges_path
