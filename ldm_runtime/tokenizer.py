"""CLIP byte-level BPE tokenizer, torch-free: the same ids as transformers' ``CLIPTokenizer``.

The pipeline, in the order the reference (transformers 5, backed by `tokenizers`) applies it:

1. special tokens (bos, eos, pad, unk) are cut out of the *raw* text, leftmost-longest match;
   so with SD-2's pad token ``!`` every ``!`` in a prompt becomes the bare ``!`` id, as it does
   in transformers.
2. each remaining piece is normalised: NFC, then per-character lowercasing (no Greek
   final-sigma rule). No ftfy, no html unescaping.
3. pre-tokenisation: CLIP's split (the literal specials, ``'s 't 're 've 'm 'll 'd``, runs of
   letters, single digits, runs of anything else; whitespace dropped), then GPT-2's byte-level
   split, whose only extra effect here is to cut a special literal that survived step 1 (say
   ``<|EndOfText|>``, lowercased) into ``<|``, ``endoftext``, ``|>``.
4. every word goes to UTF-8 bytes mapped onto printable characters (GPT-2's byte map), gets
   ``</w>`` on its last symbol, and is merged greedily: lowest merge rank first, leftmost first.
5. bos + ids + eos; truncation keeps eos last; right padding with the pad id.

Letter/number classes come from ``unicodedata`` (Python's Unicode version), whitespace is the
Unicode White_Space property, as in Oniguruma's ``\\s``.
"""
from __future__ import annotations

import functools
import heapq
import itertools
import json
import logging
import re
import sys
import threading
import unicodedata
from pathlib import Path
from typing import Callable

import numpy as np

from .manifest import contained_path

logger = logging.getLogger(__name__)

EOW = "</w>"  # end-of-word suffix carried by the last symbol of every word
CONTRACTIONS = ("s", "t", "re", "ve", "m", "ll", "d")  # after an apostrophe, CLIP's regex order
SOT_LITERAL, EOT_LITERAL = "<|startoftext|>", "<|endoftext|>"
# Unicode White_Space: what `\s` matches in the Oniguruma regexes of the reference (not \x1c-\x1f,
# which Python's str.isspace() counts, nor U+200B / U+FEFF / U+180E)
WHITESPACE = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B)))
                       + "\u2028\u2029\u202f\u205f\u3000")
# the BPE cache is cleared before it passes CACHE_LIMIT words or CACHE_BYTES (words and their
# symbols, as sys.getsizeof counts them): distinct long prompts cannot grow it without limit
CACHE_LIMIT = 100_000
CACHE_BYTES = 32 << 20
LOG_TOKENS, LOG_CHARS = 40, 200  # the most of a dropped prompt tail a truncation warning quotes
# the tokenizer options a bundle's manifest (and a checkpoint's tokenizer config) carries, as
# ``CLIPTokenizer``'s keyword arguments; the special tokens as transformers' config files name them
SPECIAL_TOKENS = ("pad_token", "bos_token", "eos_token", "unk_token")
TOKENIZER_OPTIONS = ("model_max_length", *SPECIAL_TOKENS)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map that CLIP's vocabulary is written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:  # control bytes, space, DEL, NBSP, soft hyphen: shifted past 255 to stay visible
            table[b] = chr(256 + extra)
            extra += 1
    return table


BYTE_TO_CHAR = bytes_to_unicode()
BYTE_STRINGS = [BYTE_TO_CHAR[b] for b in range(256)]
BYTE_VALUES = {c: bytes([b]) for b, c in BYTE_TO_CHAR.items()}


@functools.lru_cache(maxsize=1 << 16)  # bounded: prompts may hold any of Unicode's 1.1M code points
def char_class(c: str) -> str:
    """'s' whitespace, 'L' letter (\\p{L}), 'N' number (\\p{N}), 'P' anything else."""
    if c in WHITESPACE:
        return "s"
    cat = unicodedata.category(c)[0]
    return cat if cat in "LN" else "P"


def normalize(text: str) -> str:
    """NFC, then lowercase one character at a time (Rust's char::to_lowercase has no context)."""
    # the reference also collapses \s+ to one space; whitespace only ever separates words, so skip it
    text = unicodedata.normalize("NFC", text)
    # Python's str.lower applies the final-sigma rule to U+03A3 only; go per character there
    return "".join(c.lower() for c in text) if "\u03a3" in text else text.lower()


def pre_tokenize(text: str) -> list[str]:
    """Split normalised text into words the way CLIP's regex then GPT-2's byte-level split do."""
    words, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        k = char_class(c)
        if k == "s":
            i += 1
            continue
        if c == "<" and (text.startswith(SOT_LITERAL, i) or text.startswith(EOT_LITERAL, i)):
            lit = SOT_LITERAL if text.startswith(SOT_LITERAL, i) else EOT_LITERAL
            words += ["<|", lit[2:-2], "|>"]  # GPT-2's split: punctuation, letters, punctuation
            i += len(lit)
            continue
        if c == "'":
            suffix = next((s for s in CONTRACTIONS if text.startswith(s, i + 1)), None)
            if suffix is not None:
                words.append(text[i : i + 1 + len(suffix)])
                i += 1 + len(suffix)
                continue
        j = i + 1
        if k == "L":
            while j < n and char_class(text[j]) == "L":
                j += 1
        elif k == "P":
            while j < n and char_class(text[j]) == "P":
                j += 1
        # k == "N": digits go one at a time
        words.append(text[i:j])
        i = j
    return words


def _read_contained(root: Path, rel: str, field: str) -> bytes:
    return _read_file(contained_path(root, rel, field), field.split(".")[-1])


def _read_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"CLIP tokenizer {what} file not found: {path}") from None


# errors name the file, the line or entry and what is wrong, never the file's text: a bundle's
# tokenizer path may have been pointed at a file that is not the bundle's to show
def _read_vocab(path: Path, data: bytes) -> dict[str, int]:
    try:
        vocab = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise ValueError(f"{path}: not a valid vocab.json (expected a UTF-8 JSON object token -> id)") from None
    if not isinstance(vocab, dict) or not vocab:
        raise ValueError(f"{path}: expected a non-empty JSON object token -> id, got {type(vocab).__name__}")
    bad = next((n for n, i in enumerate(vocab.values()) if type(i) is not int or i < 0), None)
    if bad is not None:
        raise ValueError(f"{path}: entry {bad} has an id that is not a non-negative int")
    return vocab


def _read_merges(path: Path, data: bytes, vocab: dict[str, int]) -> dict[tuple[str, str], int]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: merges file is not UTF-8 (bad byte at offset {e.start})") from None
    if "\r" in text:
        text = text.replace("\r\n", "\n")
    lines = [line for line in text.split("\n") if line and not line.startswith("#version")]
    # C-level passes over ~50k lines; the line-by-line search below only runs to name a bad line
    split = map(str.split, lines, itertools.repeat(" "))
    pairs: list[tuple[str, str]] = list(map(tuple, split))  # type: ignore[arg-type]  # 2 parts: checked below
    symbols = set(itertools.chain.from_iterable(pairs))
    if set(map(len, pairs)) - {2} or "" in symbols or (symbols | set(map("".join, pairs))) - vocab.keys():
        for lineno, line in enumerate(text.split("\n"), 1):
            if not line or line.startswith("#version"):
                continue
            parts = line.split(" ")
            if len(parts) != 2 or not all(parts):
                raise ValueError(f"{path}:{lineno}: expected a merge 'left right' (two non-empty symbols "
                                 "separated by one space)")
            for tok in (*parts, "".join(parts)):
                if tok not in vocab:
                    raise ValueError(f"{path}:{lineno}: the merge uses a symbol that is not in the vocab")
    # a repeated merge keeps its last rank, as in tokenizers
    return dict(zip(pairs, range(len(pairs))))


class CLIPTokenizer:
    """CLIP's byte-level BPE tokenizer; ids equal transformers' ``CLIPTokenizer`` on the same files."""

    def __init__(self, vocab_file: str | Path, merges_file: str | Path, model_max_length: int = 77,
                 pad_token: str = "<|endoftext|>", bos_token: str = "<|startoftext|>",
                 eos_token: str = "<|endoftext|>", unk_token: str = "<|endoftext|>",
                 contents: tuple[bytes, bytes] | None = None):
        """``contents``: the vocab and merges files' bytes when the caller has read (and verified) them;
        the two paths then only name the files in errors."""
        self.vocab_file, self.merges_file = Path(vocab_file), Path(merges_file)
        vocab, merges = contents or (_read_file(self.vocab_file, "vocab"), _read_file(self.merges_file, "merges"))
        self.encoder = _read_vocab(self.vocab_file, vocab)
        self.bpe_ranks = _read_merges(self.merges_file, merges, self.encoder)
        self.model_max_length = int(model_max_length)
        if self.model_max_length < 2:
            raise ValueError(f"model_max_length must be >= 2 (room for bos and eos), got {model_max_length}")
        for role, tok in (("pad", pad_token), ("bos", bos_token), ("eos", eos_token), ("unk", unk_token)):
            if tok not in self.encoder:
                raise ValueError(f"{role}_token {tok!r} is not in the vocabulary {self.vocab_file}")
        self.pad_token, self.bos_token, self.eos_token, self.unk_token = pad_token, bos_token, eos_token, unk_token
        self.pad_token_id = self.encoder[pad_token]
        self.bos_token_id = self.encoder[bos_token]
        self.eos_token_id = self.encoder[eos_token]
        self.unk_token_id = self.encoder[unk_token]
        specials = sorted({pad_token, bos_token, eos_token, unk_token}, key=len, reverse=True)
        # longest first: re's alternation takes the first that matches, giving leftmost-longest
        self._special_re = re.compile("(" + "|".join(map(re.escape, specials)) + ")")
        self._specials = frozenset(specials)
        self._cache: dict[str, tuple[str, ...]] = {}
        self._cache_bytes = 0  # what the cache holds, bounded by CACHE_BYTES
        self._cache_lock = threading.Lock()  # pipelines tokenize on several threads

    @classmethod
    def from_manifest_entry(cls, root: str | Path, entry: dict,
                            read: Callable[[str, str], bytes] | None = None) -> "CLIPTokenizer":
        """Build from a bundle manifest's ``tokenizer`` entry; file paths are relative to ``root``.

        ``read(rel, field)`` returns a file's bytes (the pipeline passes ``Manifest.read_verified``,
        which also checks them against the manifest's hashes); by default the file is read after
        ``manifest.contained_path`` has checked that it lies inside ``root``.
        """
        missing = [k for k in ("vocab", "merges") if k not in entry]
        if missing:
            raise ValueError(f"tokenizer manifest entry is missing {missing}; got keys {sorted(entry)}")
        if read is None:
            read = functools.partial(_read_contained, Path(root))
        kw = {k: entry[k] for k in TOKENIZER_OPTIONS if k in entry}
        contents = read(entry["vocab"], "tokenizer.vocab"), read(entry["merges"], "tokenizer.merges")
        return cls(Path(root) / entry["vocab"], Path(root) / entry["merges"], **kw, contents=contents)

    @functools.cached_property
    def decoder(self) -> dict[int, str]:
        return dict(zip(self.encoder.values(), self.encoder.keys()))

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def bpe(self, word: str) -> tuple[str, ...]:
        """Merge one byte-level word: lowest rank first, ties to the leftmost pair (as tokenizers' heap)."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        syms = list(word)  # "" marks a symbol absorbed by its left neighbour
        syms[-1] += EOW
        n = len(syms)
        nxt = list(range(1, n)) + [-1]
        prv = list(range(-1, n - 1))
        ranks = self.bpe_ranks
        heap = [(r, i) for i in range(n - 1) if (r := ranks.get((syms[i], syms[i + 1]))) is not None]
        heapq.heapify(heap)
        while heap:
            r, i = heapq.heappop(heap)
            j = nxt[i]
            # stale entries: the left symbol was absorbed, or a neighbour changed since the push
            if not syms[i] or j == -1 or ranks.get((syms[i], syms[j])) != r:
                continue
            syms[i] += syms[j]
            syms[j] = ""
            nxt[i] = nxt[j]
            if nxt[i] != -1:
                prv[nxt[i]] = i
                if (r2 := ranks.get((syms[i], syms[nxt[i]]))) is not None:
                    heapq.heappush(heap, (r2, i))
            if prv[i] != -1 and (r2 := ranks.get((syms[prv[i]], syms[i]))) is not None:
                heapq.heappush(heap, (r2, prv[i]))
        out = tuple(s for s in syms if s)
        self._remember(word, out)
        return out

    def _remember(self, word: str, out: tuple[str, ...]) -> None:
        """Cache ``word``'s merge, clearing the cache first when it would pass CACHE_LIMIT words or CACHE_BYTES."""
        cost = sys.getsizeof(word) + sys.getsizeof(out) + sum(map(sys.getsizeof, out))
        if cost > CACHE_BYTES:
            return
        with self._cache_lock:
            if word in self._cache:
                return
            if len(self._cache) >= CACHE_LIMIT or self._cache_bytes + cost > CACHE_BYTES:
                self._cache.clear()
                self._cache_bytes = 0
            self._cache[word] = out
            self._cache_bytes += cost

    @property
    def cache_bytes(self) -> int:
        """Bytes the BPE cache holds (words and their symbols), at most CACHE_BYTES."""
        return self._cache_bytes

    def _pieces(self, text: str) -> list[tuple[bool, str]]:
        """Raw text -> [(is_special, piece)]: specials cut out before any normalisation."""
        return [(p in self._specials, p) for p in self._special_re.split(text) if p]

    def tokenize(self, text: str) -> list[str]:
        """BPE tokens of ``text`` (special tokens found in the text included, no bos/eos added)."""
        tokens: list[str] = []
        for special, piece in self._pieces(text):
            if special:
                tokens.append(piece)
                continue
            for word in pre_tokenize(normalize(piece)):
                bpe = self.bpe("".join(BYTE_STRINGS[b] for b in word.encode("utf-8")))
                # symbols missing from a (small) vocab become the unk token, one per symbol
                tokens += [t if t in self.encoder else self.unk_token for t in bpe]
        return tokens

    def encode(self, text: str) -> list[int]:
        """bos + ids + eos, no truncation, no padding."""
        enc = self.encoder
        return [self.bos_token_id, *(enc[t] for t in self.tokenize(text)), self.eos_token_id]

    def decode(self, ids) -> str:
        """Ids back to text: bytes decoded as UTF-8 (bad sequences replaced), ``</w>`` as a space."""
        text = "".join(self.decoder[int(i)] for i in ids)
        # a character outside the byte map (only possible in a hand-made vocab) stands for itself
        raw = b"".join(BYTE_VALUES[c] if c in BYTE_VALUES else c.encode("utf-8") for c in text)
        return raw.decode("utf-8", errors="replace").replace(EOW, " ").strip()

    def __call__(self, prompts: str | list[str]) -> np.ndarray:
        """int64 (B, model_max_length): bos + ids + eos, truncated keeping eos last, right-padded."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be a str or a list of str, got {[type(p).__name__ for p in prompts]}")
        L = self.model_max_length
        out = np.full((len(prompts), L), self.pad_token_id, dtype=np.int64)
        for b, prompt in enumerate(prompts):
            ids = self.encode(prompt)
            if len(ids) > L:
                dropped = ids[L - 1 : -1]
                logger.warning(
                    "Prompt %d: %d tokens dropped. The following part of your input was truncated because "
                    "CLIP can only handle sequences up to %d tokens: %r%s", b, len(dropped), L,
                    *self._quoted_tail(dropped))
                ids = ids[: L - 1] + [self.eos_token_id]
            out[b, : len(ids)] = ids
        return out

    def _quoted_tail(self, dropped: list[int]) -> tuple[str, str]:
        """The start of the dropped text for the truncation warning, and what was left out of it: a log
        line stays short whatever the prompt's length."""
        text = self.decode(dropped[:LOG_TOKENS])
        if len(dropped) <= LOG_TOKENS and len(text) <= LOG_CHARS:
            return text, ""
        return text[:LOG_CHARS], f" ... (cut; {len(dropped)} tokens dropped in all)"
