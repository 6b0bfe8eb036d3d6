"""Learn a small CLIP-format byte-level BPE vocabulary from a caption corpus.

CLIP's 49,408-token table would dominate a ~1M-parameter text encoder (49,408 x 128 floats =
6.3M); captions of the built-in data use ~70 distinct words, so a few hundred merges make every
one of them a single token. The files have CLIP's layout, so `ldm_runtime.tokenizer.CLIPTokenizer`
and transformers' `CLIPTokenizer` read them unchanged:

    vocab.json   the 256 byte symbols, the same 256 with "</w>", one entry per merge (in merge
                 order), then "<|startoftext|>", "<|endoftext|>" last (as in CLIP)
    merges.txt   "#version: 0.2" then one "left right" pair per line, highest priority first

Words are split exactly as the runtime tokenizer splits them (`ldm_runtime.tokenizer.pre_tokenize`
after `normalize`), so the learned merges apply to the same symbols at encode time.
"""
from __future__ import annotations

import collections
import json
import logging
from collections.abc import Iterable
from pathlib import Path

from ldm_runtime.tokenizer import BYTE_STRINGS, BYTE_TO_CHAR, EOT_LITERAL, EOW, SOT_LITERAL, normalize, pre_tokenize

logger = logging.getLogger(__name__)


def _word_symbols(word: str) -> tuple[str, ...]:
    chars = [BYTE_TO_CHAR[b] for b in word.encode("utf-8")]
    return (*chars[:-1], chars[-1] + EOW)


def learn_bpe(corpus: Iterable[str], max_merges: int = 1000, min_frequency: int = 2) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """BPE (Sennrich et al. 2016) over byte symbols -> (vocab token -> id, merges in priority order).

    Each round merges the most frequent adjacent pair (ties: the lexicographically smallest pair,
    so the result is deterministic) until `max_merges` or no pair occurs `min_frequency` times.
    """
    counts: collections.Counter[tuple[str, ...]] = collections.Counter()
    for text in corpus:
        for w in pre_tokenize(normalize(text)):
            counts[_word_symbols(w)] += 1
    words = dict(counts)
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for syms, n in words.items():
            for a, b in zip(syms, syms[1:]):
                pairs[(a, b)] += n
        if not pairs:
            break
        best_n = max(pairs.values())
        if best_n < min_frequency:
            break
        best = min(p for p, n in pairs.items() if n == best_n)
        merges.append(best)
        joined = best[0] + best[1]
        new_words: dict[tuple[str, ...], int] = {}
        for syms, n in words.items():
            out, i = [], 0
            while i < len(syms):
                if i + 1 < len(syms) and (syms[i], syms[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            new_words[tuple(out)] = new_words.get(tuple(out), 0) + n
        words = new_words
    vocab_list = [*BYTE_STRINGS, *(s + EOW for s in BYTE_STRINGS), *(a + b for a, b in merges), SOT_LITERAL, EOT_LITERAL]
    vocab: dict[str, int] = {}
    for tok in vocab_list:  # a merge result can equal an earlier token only in odd corpora; keep the first id
        vocab.setdefault(tok, len(vocab))
    return vocab, merges


def save_bpe(vocab: dict[str, int], merges: list[tuple[str, str]], folder: str | Path) -> Path:
    """Write vocab.json and merges.txt (CLIP's format) into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return folder


def train_tokenizer(corpus: Iterable[str], folder: str | Path, max_merges: int = 1000) -> tuple[Path, int]:
    """Learn and write a vocabulary; returns (folder, vocab size)."""
    vocab, merges = learn_bpe(corpus, max_merges=max_merges)
    logger.info("BPE: %d merges, vocabulary of %d tokens", len(merges), len(vocab))
    return save_bpe(vocab, merges, folder), len(vocab)
