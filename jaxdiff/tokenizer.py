"""A CLIP-format BPE tokenizer trained offline on a small corpus.

Stable Diffusion reads prompts with CLIP's byte-level BPE tokenizer
(``vocab.json`` + ``merges.txt``, words end in ``</w>``). The real vocabulary
is a download; for models trained here (the digits model, tests) we learn a
small vocabulary from the captions themselves and write it in exactly that
format, so transformers' ``CLIPTokenizer.from_pretrained`` (and diffusers'
pipelines) read it like any other SD tokenizer.
"""

from __future__ import annotations

import collections
import json
import re
from collections.abc import Iterable
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's pre-tokenisation: runs of letters, single digits, runs of other symbols.
_WORD = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+|_+")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable character table (printable bytes map to themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def train_bpe(corpus: Iterable[str], num_merges: int = 200) -> tuple[list[str], list[tuple]]:
    """Learn BPE merges from ``corpus``; returns (vocabulary tokens in id order, merges)."""
    byte_char = _bytes_to_unicode()
    words: collections.Counter[tuple[str, ...]] = collections.Counter()
    for text in corpus:
        for w in _WORD.findall(" ".join(text.lower().split())):
            chars = [byte_char[b] for b in w.encode("utf-8")]
            chars[-1] += "</w>"
            words[tuple(chars)] += 1
    base = list(byte_char.values())
    vocab = base + [c + "</w>" for c in base]
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for w, n in words.items():
            for pair in zip(w, w[1:]):
                pairs[pair] += n
        if not pairs:
            break
        # Most frequent pair; ties broken by the pair itself so training is deterministic.
        best, count = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        if count < 2:
            break
        merges.append(best)
        joined = best[0] + best[1]
        vocab.append(joined)
        new_words: collections.Counter[tuple[str, ...]] = collections.Counter()
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words[tuple(out)] += n
        words = new_words
    return vocab + [BOS, EOS], merges


def save_clip_tokenizer(
    directory: str | Path, corpus: Iterable[str], num_merges: int = 200, max_length: int = 77
) -> Path:
    """Train a BPE vocabulary on ``corpus`` and save it as a CLIP tokenizer directory.

    Args:
      directory: where ``vocab.json``, ``merges.txt``, ``tokenizer_config.json``
        and ``special_tokens_map.json`` are written.
      corpus: the texts to learn merges from.
      num_merges: the most merges to learn (vocabulary = 512 byte tokens + merges + 2).
      max_length: ``model_max_length`` (prompt length in tokens, 77 in SD).

    Returns:
      The directory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = train_bpe(corpus, num_merges)
    (directory / "vocab.json").write_text(
        json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False)
    )
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (directory / "special_tokens_map.json").write_text(json.dumps(specials))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "do_lower_case": True,
        **specials,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return directory
