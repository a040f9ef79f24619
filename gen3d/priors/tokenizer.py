"""Write small CLIP byte-level BPE tokenizers for priors trained by gen3d (and for tests).

A real `CLIPTokenizer` needs `vocab.json` and `merges.txt`. The vocabulary written here covers
every byte (so any prompt tokenizes) and makes each listed word one token, which keeps the embedded
priors' text encoders small. BPE applies the lowest-ranked pair first, so a word's merges are found by
running the merges listed so far on it and then joining what is left from left to right: the new merges
rank after every earlier one, so they never split an earlier word, and an earlier merge cannot split
this one ("spinning" is one token, not "s pin n i n g" after the merges of "pine" and "pink").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the rest to code points 256+."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def write_clip_tokenizer(folder: str | Path, words: Iterable[str], max_length: int = 77) -> int:
    """Write vocab.json, merges.txt and tokenizer_config.json under `folder`; returns the vocab size.

    BOS and EOS are the last two ids (EOS doubles as pad and unk, as in CLIP).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    known = set(tokens)
    merges: list[str] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(w.lower() for w in words if w):
        start = list(word[:-1]) + [word[-1] + "</w>"]
        pieces = _bpe(start, ranks)
        while len(pieces) > 1:  # join what the merges so far leave, from the left, until BPE gives one token
            ranks[(pieces[0], pieces[1])] = len(merges)
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = _bpe(start, ranks)
        for piece in _bpe_history(start, ranks):  # every intermediate piece is a vocabulary entry
            if piece not in known:
                known.add(piece)
                tokens.append(piece)
    tokens += [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length,
        "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS, "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return len(vocab)


def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word's pieces: merge the lowest-ranked adjacent pair, all its occurrences, until no
    listed pair is left (what CLIP's tokenizer does with merges.txt)."""
    return _bpe_history(pieces, ranks, final=True)


def _bpe_history(pieces: list[str], ranks: dict[tuple[str, str], int], final: bool = False) -> list[str]:
    """The pieces `_bpe` creates on its way (or, with `final`, the pieces it ends with)."""
    made = []
    while len(pieces) > 1:
        pair = min(zip(pieces, pieces[1:]), key=lambda p: ranks.get(p, len(ranks) + 1))
        if pair not in ranks:
            break
        out, i = [], 0
        while i < len(pieces):
            if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == pair:
                out.append(pieces[i] + pieces[i + 1])
                made.append(out[-1])
                i += 2
            else:
                out.append(pieces[i])
                i += 1
        pieces = out
    return pieces if final else made
