"""ldm_runtime.tokenizer against transformers' CLIPTokenizer: identical ids on generated prompts."""
from __future__ import annotations

import json
import logging
import random
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import ldm_runtime.tokenizer as tokenizer_module
from ldm_runtime.tokenizer import BYTE_TO_CHAR, CLIPTokenizer

transformers = pytest.importorskip("transformers")

MAX_LEN = 77
DATA_DIR = Path(__file__).parent / "data" / "clip-bpe"  # OpenAI CLIP's vocabulary (49408 tokens)
SPECIALS = ["<|startoftext|>", "<|endoftext|>"]

# fragments the generator draws from; each list covers one family of cases
WORDS = ["a", "photo", "of", "cat", "Dog", "ASTRONAUT", "riding", "horse", "on", "the", "Moon", "oil", "painting",
         "highly", "detailed", "4k", "trending", "artstation", "McDonald", "iPhone", "naïve", "Café", "jalapeño",
         "über", "STRASSE", "Straße", "ﬁsh", "résumé", "Ελληνικά", "ΟΔΟΣ", "İstanbul", "ǅemal", "ẞ", "Ωmega"]
DECOMPOSED = ["e\u0301", "cafe\u0301", "n\u0303o", "A\u030a", "u\u0308ber", "x\u0301", "\u0301", "o\u0308\u0304",
              "Ι\u0308\u0301", "\u1100\u1161\u11a8"]  # last: conjoining hangul jamo, composes under NFC
SCRIPTS = ["猫が好き", "一只猫", "東京タワー", "한국어 텍스트", "Привет мир", "ЁЖИК", "مرحبا بالعالم", "שלום", "नमस्ते",
           "ภาษาไทย", "ქართული", "Ἀθῆναι", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "𝐁𝐨𝐥𝐝", "ｆｕｌｌｗｉｄｔｈ", "ꓚꓰꓣ", "ǈǋ"]
EMOJI = ["🐱", "😀😃", "👍🏽", "👩‍💻", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇯🇵", "❤️", "✨🌙✨", "🧑🏿‍🚀", "©®™", "☕"]
PUNCT = ["!!!???...", "---", "'''", "...", "?!", "«»", "“quoted”", "(parens)", "[x]", "{y}", "@#$%^&*", "~`|\\",
         "\"", "'", "…", "—", "–", "·", "!", "!!", "a!b", "/", "_", "__init__", ":-)", "<3", "¿qué?", "¡hola!"]
CONTRACTIONS = ["it's", "I'LL", "we've", "don't", "you're", "I'm", "she'd", "'s", "'S", "rock'n'roll", "o'clock",
                "it’s", "y'all'd've", "'''s", "''ll", "x's'", "'", "'re'"]
NUMBERS = ["1234567", "3.14", "½", "²", "1st", "2,000", "0x1F", "٣٤", "一二三", "Ⅻ", "①②", "१२३", "10%", "-5",
           "1e-3", "¾", "₂"]
SPACES = [" ", "  ", "\t", "\n", "\r\n", "   \t\n  ", "\u00a0", "\u3000", "\u2003", "\u200b", "\ufeff", "\x0b",
          "\x0c", "\x1c", "\x85", "\u2028", "\u180e"]
HTML = ["<b>bold</b>", "&amp;", "&lt;tag&gt;", "<br/>", "<a href=\"x.html\">link</a>", "&#39;", "<|", "|>",
        "<|endoftext", "startoftext|>", "<|ENDOFTEXT|>", "<|StartOfText|>", "<||>", "< |endoftext| >"]
FAMILIES = [WORDS, WORDS, WORDS, DECOMPOSED, SCRIPTS, EMOJI, PUNCT, CONTRACTIONS, NUMBERS, HTML, SPECIALS]

FIXED = ["", " ", "   ", "\t", "\n\n", " \t\n\r\u3000 ", "a", "A", "a photo of a cat", "  leading", "trailing  ",
         "  both  ", "!", "!!!", "hello!", "!hello", "<|startoftext|>", "<|endoftext|>", "<|endoftext|><|endoftext|>",
         "a<|startoftext|>b<|endoftext|>c", "<|startoftext|>" * 40, "x " * 80, "x " * 75, "x " * 76, "x " * 74,
         "word" * 60, "a" * 300, "!" * 100, "🐱" * 50, "ΟΔΟΣ σοφός", "e\u0301 é", "é<|endoftext|>\u0301",
         "e<|endoftext|>\u0301", "<|<|endoftext|>|>", "<<|endoftext|>>", "<|endoftext|>'s", "it's<|endoftext|>'ll",
         "The quick brown fox jumps over the lazy dog. " * 6, "\u0301\u0301\u0301", "a\u200db", "a\u00adb", "\x00\x01"]


def make_prompts(n: int, seed: int = 0) -> list[str]:
    """FIXED plus n random prompts mixing every fragment family with every kind of separator."""
    rng = random.Random(seed)
    prompts = list(FIXED)
    for i in range(n):
        k = rng.choice([1, 2, 3, 5, 8, 13, 21]) if i % 10 else rng.randint(60, 140)  # every 10th far over 77
        parts = []
        for _ in range(k):
            frag = rng.choice(rng.choice(FAMILIES))
            r = rng.random()
            if r < 0.15:
                frag = frag.upper()
            elif r < 0.25:
                frag = frag.title()
            parts.append(frag)
            parts.append(rng.choice(SPACES) if rng.random() < 0.3 else rng.choice([" ", "", ", "]))
        text = "".join(parts)
        if rng.random() < 0.2:
            text = rng.choice(SPACES) + text + rng.choice(SPACES)
        prompts.append(text)
    return prompts


PROMPTS = make_prompts(600)


def clip(**kw) -> CLIPTokenizer:
    return CLIPTokenizer(DATA_DIR / "vocab.json", DATA_DIR / "merges.txt", **kw)


def reference(vocab: Path, merges: Path, **kw):
    return transformers.CLIPTokenizer(str(vocab), str(merges), model_max_length=MAX_LEN, **kw)


def ref_batch(ref, prompts: list[str]) -> np.ndarray:
    return np.asarray(ref(prompts, padding="max_length", max_length=MAX_LEN, truncation=True).input_ids, np.int64)


@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    return clip()


@pytest.fixture(scope="module")
def ref():
    return reference(DATA_DIR / "vocab.json", DATA_DIR / "merges.txt")


def assert_same_ids(ours: CLIPTokenizer, ref, prompts: list[str]) -> None:
    got, want = ours(prompts), ref_batch(ref, prompts)
    bad = [p for p, g, w in zip(prompts, got, want) if not np.array_equal(g, w)]
    assert not bad, f"ids differ for {len(bad)} of {len(prompts)} prompts, first: {bad[0]!r}"
    # untruncated ids and token strings too
    full = [ours.encode(p) for p in prompts]
    n_long = sum(len(ids) > MAX_LEN for ids in full)
    bad = [p for p, ids, w in zip(prompts, full, ref(prompts).input_ids) if ids != list(w)]
    print(f"{len(prompts)} prompts ({n_long} over {MAX_LEN} tokens): {len(bad)} differ from transformers")
    assert not bad, f"untruncated ids differ for {len(bad)} prompts, first: {bad[0]!r}"
    bad = [p for p in prompts if ours.tokenize(p) != ref.tokenize(p)]
    assert not bad, f"tokens differ for {len(bad)} prompts, first: {bad[0]!r}"


def test_prompt_mix_covers_the_cases():
    text = "".join(PROMPTS)
    for needle in ["e\u0301", "é", "猫", "Привет", "مرحبا", "👨‍👩‍👧‍👦", "👍🏽", "!!!???...", "I'LL", "\t", "\n", "½",
                   "<|endoftext|>", "<|startoftext|>", "<b>"]:
        assert needle in text, needle
    assert len(PROMPTS) >= 500 and "" in PROMPTS and "   " in PROMPTS


def test_ids_match_transformers(tok, ref):
    assert (tok.vocab_size, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        ref.vocab_size, ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
    assert_same_ids(tok, ref, PROMPTS)


def test_ids_match_transformers_sd2_pad():
    # SD-2 pads with "!", which transformers registers as a special token: "!" in a prompt gets id 0
    ours = clip(pad_token="!")
    ref = reference(DATA_DIR / "vocab.json", DATA_DIR / "merges.txt", pad_token="!")
    assert ours.pad_token_id == ref.pad_token_id == 0
    assert_same_ids(ours, ref, PROMPTS)


def test_code_points_match_transformers(tok, ref):
    # letter/number/whitespace classes, NFC and lowercasing, one character at a time; code points
    # unassigned in Python's Unicode database are skipped (the reference may know a newer Unicode)
    import unicodedata

    rng = random.Random(1)
    cps = [*range(0x20, 0x800), *range(0x1E00, 0x2200), *range(0x3000, 0x3100), *range(0xFB00, 0xFF00),
           *rng.sample(range(0x110000), 6000)]
    chars = [chr(c) for c in cps if not 0xD800 <= c < 0xE000 and unicodedata.category(chr(c)) != "Cn"]
    texts = [f"Ab{c}Cd {c}{c}1" for c in chars]
    want = ref(texts).input_ids
    bad = [t for t, w in zip(texts, want) if tok.encode(t) != list(w)]
    print(f"{len(texts)} code points (Unicode {unicodedata.unidata_version}): {len(bad)} differ")
    assert not bad, [hex(ord(t[2])) for t in bad[:20]]


def test_decode_matches_transformers(tok, ref):
    for p in PROMPTS[::7]:
        ids = tok.encode(p)
        assert tok.decode(ids) == ref.decode(ids), p


def test_truncation_warning(tok, caplog):
    prompt = " ".join(["cat"] * 100)  # 100 content tokens: 75 kept, 25 dropped
    with caplog.at_level(logging.WARNING, logger="ldm_runtime.tokenizer"):
        ids = tok(prompt)
    assert ids[0, 0] == tok.bos_token_id and ids[0, -1] == tok.eos_token_id
    assert (ids[0, 1:-1] == tok.encode("cat")[1]).all()
    msgs = [r.getMessage() for r in caplog.records if r.name == "ldm_runtime.tokenizer"]
    print(msgs)
    assert len(msgs) == 1
    assert "25 tokens dropped" in msgs[0]
    assert "truncated because CLIP can only handle sequences up to 77 tokens" in msgs[0]
    assert repr(" ".join(["cat"] * 25)) in msgs[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ldm_runtime.tokenizer"):
        tok(["x " * 75, "short"])  # exactly 77 with bos/eos: nothing dropped
    assert not caplog.records


def test_batch_shape_and_dtype(tok):
    out = tok(["a", "b c", "<|endoftext|>"])
    assert out.shape == (3, MAX_LEN) and out.dtype == np.int64
    assert tok("a").shape == (1, MAX_LEN)
    assert tok([]).shape == (0, MAX_LEN)
    assert (tok("")[0] == [tok.bos_token_id] + [tok.eos_token_id] * (MAX_LEN - 1)).all()
    with pytest.raises(TypeError):
        tok(["a", 3])


def _learn_tiny_clip_vocab(texts: list[str], n_merges: int, out: Path, byte_alphabet: list[int]) -> None:
    """A CLIP-format vocab.json/merges.txt: byte symbols, their </w> forms, merges, then the specials."""
    symbols = [BYTE_TO_CHAR[b] for b in byte_alphabet]
    vocab = symbols + [s + "</w>" for s in symbols]
    words = Counter()
    for t in texts:
        for w in t.lower().split():
            if "<|" in w:  # keep the specials out of the merges: they must be the last two ids
                continue
            chars = [BYTE_TO_CHAR[b] for b in w.encode("utf-8")]
            if all(c in symbols for c in chars):
                words[tuple(chars[:-1]) + (chars[-1] + "</w>",)] += 1
    merges = []
    while len(merges) < n_merges:
        pairs = Counter()
        for w, c in words.items():
            for a, b in zip(w, w[1:]):
                pairs[a, b] += c
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append(f"{a} {b}")
        if a + b not in vocab:  # two merges may spell the same token
            vocab.append(a + b)
        new = Counter()
        for w, c in words.items():
            i, merged = 0, []
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == (a, b):
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(w[i])
                    i += 1
            new[tuple(merged)] += c
        words = new
    vocab += SPECIALS
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), "utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", "utf-8")


@pytest.mark.parametrize("alphabet", ["all-bytes", "ascii-only"])
def test_tiny_clip_format_vocab(tmp_path, alphabet):
    # ascii-only leaves most bytes out of the vocab: those symbols must become the unk token, as in transformers
    corpus = [" ".join(family) for family in FAMILIES] + FIXED + ["the cat sat on the mat"] * 20
    bytes_ = list(range(256)) if alphabet == "all-bytes" else list(range(33, 127))
    _learn_tiny_clip_vocab(corpus, 300, tmp_path, bytes_)
    vocab, merges = tmp_path / "vocab.json", tmp_path / "merges.txt"
    ours, ref = CLIPTokenizer(vocab, merges), reference(vocab, merges)
    n_merges = len(merges.read_text("utf-8").splitlines()) - 1
    print(f"tiny vocab: {ours.vocab_size} tokens, {n_merges} merges")
    assert ours.vocab_size == ref.vocab_size and n_merges >= 200
    assert (ours.bos_token_id, ours.eos_token_id) == (ours.vocab_size - 2, ours.vocab_size - 1)
    assert_same_ids(ours, ref, PROMPTS[::3])


def test_from_manifest_entry(tmp_path):
    shutil.copytree(DATA_DIR, tmp_path / "tokenizer")
    entry = {"vocab": "tokenizer/vocab.json", "merges": "tokenizer/merges.txt", "model_max_length": 77,
             "pad_token": "!"}
    ours = CLIPTokenizer.from_manifest_entry(tmp_path, entry)
    ref = reference(tmp_path / "tokenizer/vocab.json", tmp_path / "tokenizer/merges.txt", pad_token="!")
    assert ours.pad_token_id == 0 and ours.model_max_length == 77
    prompts = ["a photo of a cat!", "", "hi!!! <|endoftext|>"]
    np.testing.assert_array_equal(ours(prompts), ref_batch(ref, prompts))
    with pytest.raises(ValueError, match="merges"):
        CLIPTokenizer.from_manifest_entry(tmp_path, {"vocab": "tokenizer/vocab.json"})


def test_bad_files_and_tokens(tmp_path):
    vocab, merges = DATA_DIR / "vocab.json", DATA_DIR / "merges.txt"
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CLIPTokenizer(tmp_path / "nope.json", merges)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        CLIPTokenizer(vocab, tmp_path / "nope.txt")
    (tmp_path / "broken.json").write_text("{not json", "utf-8")
    with pytest.raises(ValueError, match="broken.json"):
        CLIPTokenizer(tmp_path / "broken.json", merges)
    (tmp_path / "list.json").write_text("[1, 2]", "utf-8")
    with pytest.raises(ValueError, match="list.json"):
        CLIPTokenizer(tmp_path / "list.json", merges)
    (tmp_path / "bad.txt").write_text("#version: 0.2\ni n\nthree part line\n", "utf-8")
    with pytest.raises(ValueError, match=r"bad.txt:3"):
        CLIPTokenizer(vocab, tmp_path / "bad.txt")
    (tmp_path / "oov.txt").write_text("#version: 0.2\ni n\nqqqq zzzz\n", "utf-8")
    with pytest.raises(ValueError, match=r"oov.txt:3: .*not in the vocab") as e:  # the line, never its text
        CLIPTokenizer(vocab, tmp_path / "oov.txt")
    assert "qqqq" not in str(e.value)
    with pytest.raises(ValueError, match="<pad-not-there>"):
        clip(pad_token="<pad-not-there>")


def test_bpe_cache_keeps_ids(ref, monkeypatch):
    """A fresh tokenizer gives transformers' ids with a cold cache, a warm one, and one cleared
    many times over (limit 64 words); throughput is printed, not asserted."""
    want = ref_batch(ref, PROMPTS)
    fresh = clip()
    t0 = time.perf_counter()
    cold = fresh(PROMPTS)
    t1 = time.perf_counter()
    warm = fresh(PROMPTS)
    t2 = time.perf_counter()
    print(f"{len(PROMPTS)} prompts: {(t1 - t0) * 1e3:.0f} ms cold cache, {(t2 - t1) * 1e3:.0f} ms warm")
    np.testing.assert_array_equal(cold, want)
    np.testing.assert_array_equal(warm, want)
    monkeypatch.setattr(tokenizer_module, "CACHE_LIMIT", 64)
    small = clip()
    np.testing.assert_array_equal(small(PROMPTS), want)
    assert len(fresh._cache) > 64 >= len(small._cache)
