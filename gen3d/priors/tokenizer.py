"""Write small CLIP byte-level BPE tokenizers for priors trained by gen3d (and for tests).

A real `CLIPTokenizer` needs `vocab.json` and `merges.txt`. The vocabulary written here covers
every byte (so any prompt tokenizes) and adds each listed word's left-to-right merges, so most
words become one token and the rest a few (BPE applies the lowest-ranked pair first, so a merge
listed for an earlier word can split a later one), which keeps the embedded priors' text
encoders small.
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
    seen_merges: set[str] = set()
    for word in dict.fromkeys(w.lower() for w in words if w):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merge = f"{pieces[0]} {pieces[1]}"
            if merge not in seen_merges:
                seen_merges.add(merge)
                merges.append(merge)
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            if pieces[0] not in known:
                known.add(pieces[0])
                tokens.append(pieces[0])
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
