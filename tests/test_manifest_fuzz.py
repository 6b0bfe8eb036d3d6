"""A seeded fuzzer of the bundle manifest: every mutant loads and generates correctly, or fails cleanly.

Mutations of the tiny fp32 bundle's ``manifest.json`` (only that file is rewritten; the bundle is
copied once): a key deleted at any depth, a type changed, negative, zero and huge numbers, NaN and
Infinity, wrong dtype strings, unicode garbage, paths with ``..``, absolute paths and symlinks
leading out, plus whole-file damage (not UTF-8, nesting too deep, not JSON). Each mutant gets one
of these outcomes (``classify``):

- ``ok``: it loads and generates a sane 32x32 image (2 steps), equal to the unmutated bundle's
  image where the mutation touches nothing the runtime reads;
- ``clean``: ``BundleError`` or ``PipelineInputError`` naming the mutated field;
- ``unnamed``: one of those, not naming it; ``raw``: any other exception;
- ``silent``: it generated, but a file outside the bundle was opened (an inotify watch on a folder
  of faithful copies beside it, so onnxruntime's own opens are seen too), or a bundle file was
  opened whose ``files`` record is missing or wrong, or the image is wrong, or the mutant had to
  fail (NaN, a path out, a required key deleted, ...);
- ``crash``: the process died (script mode only); ``data loss``: a file of the bundle or of the
  canary folder changed.

The suite asserts ``ok`` or ``clean`` for every mutant (60 fast, all 320 under ``-m slow``).
Engines of the unmutated bundle are reused where a mutant leaves every graph and file record the
pipeline reads as it was. As a script it prints the counts by outcome:

    .venv/bin/python tests/test_manifest_fuzz.py [--bundle DIR] [-n 320] [--seed 0] [--show raw,silent]

``--bundle`` defaults to the tiny test bundle (exported once into ``/tmp/ldm-fuzz-tiny``). For the
runtime of another checkout: ``PYTHONPATH=/path/to/checkout python tests/test_manifest_fuzz.py``.
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import json
import math
import os
import random
import shutil
import struct
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

OUTCOMES = ("ok", "clean", "unnamed", "raw", "silent", "crash", "data loss")
FAST = 60  # mutants in the fast test; the rest are marked slow
SIZE = 32  # generated image size: 4x4 latents on the tiny bundle
IRRELEVANT = ("created", "producer", "source", "opset", "precision", "engines", "nodes", "parity", "fp16",
              "seconds", "shares_weights", "fused_attention")  # keys nothing reads for a generation
RELEVANT = ("latent", "scheduler", "tokenizer", "text")  # a valid change there may change the image
POSITIVE = {("latent", "channels"), ("latent", "scaling_factor"), ("latent", "vae_scale_factor"),
            ("default_size", "height"), ("default_size", "width"), ("text", "max_length"),
            ("text", "hidden_size"), ("tokenizer", "model_max_length"), ("scheduler", "config", "num_train_timesteps"),
            ("scheduler", "config", "beta_start"), ("scheduler", "config", "beta_end")}
REQUIRED = {("files",), ("components",), ("latent",), ("default_size",), ("text",), ("tokenizer",), ("scheduler",),
            ("schema",), ("schema_version",), ("latent", "channels"), ("latent", "scaling_factor"),
            ("latent", "vae_scale_factor"), ("text", "max_length"), ("text", "hidden_size"),
            ("tokenizer", "vocab"), ("tokenizer", "merges"), ("scheduler", "name"), ("scheduler", "config")}
USED = ("text_encoder", "unet", "vae_decoder")  # the text-to-image pipeline's components
GARBAGE = ("\ud800", "\u202e\u0000x", "\U0001f4a5" * 40, "e\u0301\uffff", "\x7f\x1b[2J", "")
HUGE = (10**30, 1e308, 2**63, 10**400)
DTYPES = ("float64", "bfloat16", "int8", "", "FLOAT", "float16", "int32")


@dataclass
class Mutant:
    name: str
    path: tuple = ()
    must_fail: bool = False
    relevant: bool = False  # may change the image
    write: Callable[[dict], bytes] | None = None  # the manifest bytes; None: json of the mutated dict
    mutate: Callable[[dict], None] | None = None
    names: tuple[str, ...] = ()  # words the error must contain (any one)

    def manifest_bytes(self, base: dict) -> bytes:
        if self.write is not None:
            return self.write(base)
        data = copy.deepcopy(base)
        self.mutate(data)
        return json.dumps(data, indent=1).encode("utf-8", "surrogatepass")


# -- building mutants ----------------------------------------------------------------------------

def _get(data: Any, path: tuple) -> Any:
    for k in path:
        data = data[k]
    return data


def _setter(path: tuple, value: Any) -> Callable[[dict], None]:
    def mutate(data: dict) -> None:
        _get(data, path[:-1])[path[-1]] = value
    return mutate


def _deleter(path: tuple) -> Callable[[dict], None]:
    def mutate(data: dict) -> None:
        del _get(data, path[:-1])[path[-1]]
    return mutate


def _field_words(path: tuple) -> tuple[str, ...]:
    keys = [k for k in path if isinstance(k, str)]
    if len(keys) > 1:
        keys = keys[1:]
    return tuple(keys[-2:])


def _paths(data: Any, path: tuple = ()):
    """Every path below ``data``; not into parity/nodes records (measurements nothing reads)."""
    if path:
        yield path
    if path and path[-1] in ("parity", "nodes", "producer", "cases"):
        return
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for k, v in items:
        yield from _paths(v, path + (k,))


def _is_path_field(path: tuple) -> bool:
    return (path[-1] in ("file", "vocab", "merges") or (len(path) > 1 and path[-2] == "external_data")) \
        and path[0] in ("components", "tokenizer")


def _in_use(base: dict, path: tuple) -> bool:
    """Whether a text-to-image pipeline on onnxruntime CPU reads the thing at ``path``."""
    if path[0] == "components":
        return len(path) < 2 or (path[1] in USED and not (len(path) > 2 and path[2] in ("file", "external_data")
                                                          and "cpu_variant" in base["components"][path[1]]))
    if path[0] == "files":
        return len(path) < 2 or path[1] in used_files(base)
    return path[0] not in IRRELEVANT


def used_files(base: dict) -> set[str]:
    out = {base["tokenizer"]["vocab"], base["tokenizer"]["merges"]}
    for c in USED:
        entry = base["components"][c].get("cpu_variant") or base["components"][c]
        out |= {entry["file"], *entry.get("external_data", [])}
    return out


def _relevant(path: tuple) -> bool:
    return path[0] in RELEVANT


def _must_fail_value(path: tuple, op: str, base: dict) -> bool:
    if op in ("nan", "inf", "dotdot", "absolute", "symlink"):
        return True
    if op in ("negative", "zero") and (path in POSITIVE or "shape" in path):
        return True
    if op == "dtype":
        return _in_use(base, path)
    return False


def _must_fail_delete(path: tuple, base: dict) -> bool:
    if path in REQUIRED:
        return True
    if path[0] == "components" and len(path) >= 2 and _in_use(base, path):
        return len(path) == 2 or path[2] in ("inputs", "outputs") or (path[2] in ("file",) and len(path) == 3)
    return path[0] == "files" and len(path) >= 2 and _in_use(base, path)


def value_mutants(base: dict, path: tuple, canary: Path) -> list[Mutant]:
    """Every value mutation that applies at ``path``."""
    v = _get(base, path)
    out = []

    def add(op: str, value: Any, extra: Callable[[dict], None] | None = None, must: bool | None = None) -> None:
        setter = _setter(path, value)

        def mutate(d: dict) -> None:
            setter(d)
            if extra is not None:
                extra(d)
        must_fail = _must_fail_value(path, op, base) if must is None else must
        shown = (value[:40], repr(value)[1:41]) if isinstance(value, str) and value else ()  # quoting it names it too
        out.append(Mutant(f"{op} {_show(path)} = {value!r:.60}", path, must_fail, _relevant(path), mutate=mutate,
                          names=_field_words(path) + shown))

    for other in (None, True, "x", 7, 1.5, [], {}):
        if type(other) is not type(v):
            add("retype", other, must=_in_use(base, path) and path[0] not in ("producer",) and
                (path in REQUIRED or path[-1] in ("file", "inputs", "outputs", "dtype", "shape", "name", "sha256",
                                                  "bytes") or path[:1] in (("latent",), ("text",), ("default_size",))))
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        add("negative", -v if v else -1)
        add("zero", 0)
        for h in HUGE:
            add("huge", h, must=False)
        add("nan", math.nan)
        add("inf", math.inf)
    if isinstance(v, str):
        for g in GARBAGE:
            add("garbage", g + v[:3], must=_is_path_field(path) and _in_use(base, path) or "\ud800" in g)
    if path[-1] == "dtype":
        for dt in DTYPES:
            if dt != v:
                add("dtype", dt)
    if _is_path_field(path) and isinstance(v, str):
        used = _in_use(base, path)  # a path out that nothing opens may pass (`ldm verify` reports it)
        add("dotdot", f"../{canary.name}/{v}", must=used)
        add("dotdot", f"tokenizer/../../{canary.name}/{v}", must=used)
        add("absolute", str(canary / v), must=used)
        add("symlink", f"out/{v}", must=used)
        for op, rel in (("dotdot", f"../{canary.name}/{v}"), ("absolute", str(canary / v)), ("symlink", f"out/{v}")):
            add(op + "+recorded", rel, extra=_recorder(rel, v), must=used)
    return out


def _recorder(rel: str, original: str) -> Callable[[dict], None]:
    def extra(d: dict) -> None:
        d["files"][rel] = dict(d["files"][original])  # the outside copy's true size and sha256
    return extra


def _show(path: tuple) -> str:
    return ".".join(str(k) for k in path)


def whole_file_mutants(canary: Path) -> list[Mutant]:
    def text(d: dict) -> str:
        return json.dumps(d, indent=1)

    def nested(depth: int) -> Callable[[dict], bytes]:
        return lambda d: text(d).replace('"parity": {', '"parity": {"deep": ' + "[" * depth + "]" * depth + ",", 1).encode()

    def patched(old: str, new: str) -> Callable[[dict], bytes]:
        return lambda d: text(d).replace(old, new, 1).encode()

    words = ("manifest",)
    return [
        Mutant("not UTF-8 (latin-1 byte in a string)",
               write=lambda d: text(d).replace('"created": "', '"created": "\xe9', 1).encode("latin-1"),
               must_fail=True, names=words),
        Mutant("UTF-16", write=lambda d: text(d).encode("utf-16"), must_fail=True, names=words),
        Mutant("nested 100000 deep", write=nested(100000), must_fail=True, names=words),
        Mutant("nested 200 deep", write=nested(200), must_fail=True, names=("parity", "manifest")),
        Mutant("truncated", write=lambda d: text(d).encode()[:-40], must_fail=True, names=words),
        Mutant("empty", write=lambda d: b"", must_fail=True, names=words),
        Mutant("a JSON list", write=lambda d: b"[1, 2]", must_fail=True, names=words),
        Mutant("integer of 5000 digits", write=patched('"channels": 4', '"channels": ' + "9" * 5000),
               must_fail=True, names=words + ("channels",)),
        Mutant("NaN literal", write=patched('"scaling_factor": ', '"scaling_factor": NaN, "x": '), must_fail=True,
               names=("scaling_factor",)),
        Mutant("duplicate keys (last wins)", write=patched('"channels": 4', '"channels": 4, "channels": 3'),
               must_fail=True, relevant=True, names=("channels",)),
        Mutant("huge manifest (17 MiB of whitespace)", write=lambda d: text(d).encode() + b" " * (17 << 20),
               must_fail=False, names=words),
    ]


def issue_mutants(base: dict, canary: Path) -> list[Mutant]:
    """The probes of issue 15 that the random sweep may miss."""
    def m(name: str, path: tuple, value: Any, must: bool = True, relevant: bool = True) -> Mutant:
        return Mutant(name, path, must, relevant, mutate=_setter(path, value), names=_field_words(path))

    sched = ("scheduler", "config")
    return [
        m("vae_scale_factor 0", ("latent", "vae_scale_factor"), 0),
        m("vae_scale_factor 4 (wrong: the VAE's is 8)", ("latent", "vae_scale_factor"), 4),
        m("vae_scale_factor 16 (wrong)", ("latent", "vae_scale_factor"), 16),
        m("vae_scale_factor 3", ("latent", "vae_scale_factor"), 3),
        m("scaling_factor 0", ("latent", "scaling_factor"), 0),
        m("scaling_factor 1e-300", ("latent", "scaling_factor"), 1e-300),
        m("scaling_factor 2.0 (valid)", ("latent", "scaling_factor"), 2.0, must=False),
        m("shift_factor 1e300", ("latent", "shift_factor"), 1e300),
        m("channels 3", ("latent", "channels"), 3),
        m("beta_end -5", sched + ("beta_end",), -5),
        m("beta_end NaN", sched + ("beta_end",), math.nan),
        m("beta_start 2", sched + ("beta_start",), 2.0),
        m("num_train_timesteps 10**12", sched + ("num_train_timesteps",), 10**12),
        m("beta_schedule bogus", sched + ("beta_schedule",), "bogus"),
        m("prediction_type bogus", sched + ("prediction_type",), "bogus"),
        m("scheduler name bogus", ("scheduler", "name"), "bogus"),
        m("scheduler name euler (valid)", ("scheduler", "name"), "euler", must=False),
        m("unet sample dtype float16", ("components", "unet", "inputs", 0, "dtype"), "float16"),
        m("unet timestep dtype int64", ("components", "unet", "inputs", 1, "dtype"), "int64"),
        m("unet input renamed", ("components", "unet", "inputs", 0, "name"), "latents"),
        m("unet output renamed", ("components", "unet", "outputs", 0, "name"), "noise"),
        m("text hidden size 65", ("text", "hidden_size"), 65),
        m("text max_length 76", ("text", "max_length"), 76),
        m("encoder_hidden_states dim 2 = 33", ("components", "unet", "inputs", 2, "shape", 2), 33),
        m("files = {}", ("files",), {}),
        m("tokenizer merges ../../../../etc/passwd", ("tokenizer", "merges"), "../../../../etc/passwd"),
        m("pad_token not in the vocab", ("tokenizer", "pad_token"), "<|nope|>"),
        m("model_max_length 10**30", ("tokenizer", "model_max_length"), 10**30),
        m("default_size 33", ("default_size", "height"), 33),
        m("default_size 10**9", ("default_size", "height"), 10**9),
        m("files sha256 of unet.cpu.onnx flipped", ("files", "unet.cpu.onnx", "sha256"),
          ("0" if base["files"]["unet.cpu.onnx"]["sha256"][0] != "0" else "1") + base["files"]["unet.cpu.onnx"]["sha256"][1:]),
        m("files bytes of the vocab + 1", ("files", "tokenizer/vocab.json", "bytes"),
          base["files"]["tokenizer/vocab.json"]["bytes"] + 1),
    ]


def make_mutants(base: dict, canary: Path, n: int, seed: int = 0) -> list[Mutant]:
    """The first ``n`` mutants of ``base``: whole-file and issue probes first, then a seeded random sweep."""
    fixed = whole_file_mutants(canary) + issue_mutants(base, canary)
    sweep = [Mutant(f"delete {_show(p)}", p, _must_fail_delete(p, base), _relevant(p), mutate=_deleter(p),
                    names=_field_words(p)) for p in _paths(base)]
    for p in _paths(base):
        sweep += value_mutants(base, p, canary)
    sweep = _round_robin(sweep, random.Random(seed))
    # interleave, so the fast subset holds fixed probes and random ones
    out = fixed[: FAST // 2] + sweep[: FAST - FAST // 2] + fixed[FAST // 2:] + sweep[FAST - FAST // 2:]
    return out[:n]


def _round_robin(mutants: list[Mutant], rng: random.Random) -> list[Mutant]:
    """``mutants`` shuffled within each operator (delete, retype, nan, ...), then one of each operator in turn."""
    groups: dict[str, list[Mutant]] = {}
    for m in mutants:
        groups.setdefault(m.name.split()[0], []).append(m)
    for group in groups.values():
        rng.shuffle(group)
    out = []
    while any(groups.values()):
        for op in sorted(groups):
            if groups[op]:
                out.append(groups[op].pop())
    return out


# -- watching opens --------------------------------------------------------------------------------

class OpenWatch:
    """inotify (Linux) watches on folders: which files in them were opened, by any code in the process."""

    IN_OPEN, IN_ACCESS = 0x20, 0x01

    def __init__(self, folders: list[Path]):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self.folders: dict[int, Path] = {}
        for f in folders:
            wd = self.libc.inotify_add_watch(self.fd, str(f).encode(), self.IN_OPEN | self.IN_ACCESS)
            if wd < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch {f} failed")
            self.folders[wd] = f

    def opened(self) -> set[Path]:
        """The paths opened since the last call (a folder itself when opened without a name)."""
        out: set[Path] = set()
        while True:
            try:
                buf = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return out
            i = 0
            while i < len(buf):
                wd, _mask, _cookie, n = struct.unpack_from("iIII", buf, i)
                name = buf[i + 16:i + 16 + n].rstrip(b"\0").decode(errors="replace")
                out.add(self.folders[wd] / name if name else self.folders[wd])
                i += 16 + n

    def close(self) -> None:
        os.close(self.fd)


# -- the harness -------------------------------------------------------------------------------------

def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Size and mtime of every entry but the manifest (which the harness rewrites)."""
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.name != "manifest.json"}


@dataclass
class Harness:
    """A copy of ``bundle`` beside a canary folder of its files' copies, and the unmutated bundle's output."""

    bundle: Path
    work: Path
    base: dict = field(init=False)
    root: Path = field(init=False)
    canary: Path = field(init=False)

    def __post_init__(self):
        self.root, self.canary = self.work / "bundle", self.work / "canary"
        shutil.copytree(self.bundle, self.root, symlinks=True)
        shutil.copytree(self.bundle, self.canary, symlinks=True)
        (self.canary / "manifest.json").unlink()
        (self.root / "out").symlink_to(self.canary, target_is_directory=True)
        self.manifest = self.root / "manifest.json"
        self.original = self.manifest.read_bytes()
        self.base = json.loads(self.original)
        dirs = [self.canary, *[p for p in self.canary.rglob("*") if p.is_dir()],
                self.root, *[p for p in self.root.rglob("*") if p.is_dir() and not p.is_symlink()]]
        self.watch = OpenWatch(dirs)
        self.snapshot = {"bundle": _snapshot(self.root), "canary": _snapshot(self.canary)}
        from ldm_runtime import Pipeline

        self.pipe = Pipeline.load(self.root)
        self.want = self.generate(self.pipe)
        self.engines = dict(self.pipe.engines)
        self.watch.opened()

    def generate(self, pipe) -> np.ndarray:
        return pipe("a red circle", num_inference_steps=2, height=SIZE, width=SIZE, seed=0, output_type="np").images

    def graphs_unchanged(self, data: dict) -> bool:
        """Whether every component entry and file record the pipeline reads is the unmutated one."""
        try:
            return all(data["components"][c] == self.base["components"][c] for c in USED) and \
                all(data["files"].get(f) == self.base["files"][f] for f in used_files(self.base))
        except (KeyError, TypeError, AttributeError):
            return False

    def run(self, mutant: Mutant) -> tuple[str, str]:
        """(outcome, detail) of one mutant."""
        from ldm_runtime import Pipeline
        from ldm_runtime.manifest import BundleError
        from ldm_runtime.pipeline import PipelineInputError

        raw = mutant.manifest_bytes(self.base)
        self.manifest.write_bytes(raw)
        image, error = None, None
        try:
            pipe = Pipeline.load(self.root)
            try:
                data = json.loads(raw)
            except (ValueError, RecursionError):
                data = None
            if data is not None and self.graphs_unchanged(data):
                pipe.engines.update(self.engines)
            image = self.generate(pipe)
        except Exception as e:  # noqa: BLE001 - the point: any exception type is an outcome
            error = e
        finally:
            self.manifest.write_bytes(self.original)
        opened = self.watch.opened()
        outcome, detail = self._judge(mutant, raw, image, error, opened, (BundleError, PipelineInputError))
        if _snapshot(self.root) != self.snapshot["bundle"] or _snapshot(self.canary) != self.snapshot["canary"]:
            outcome, detail = "data loss", "a file of the bundle or the canary folder changed"
        self.watch.opened()  # the snapshots' own folder reads
        return outcome, detail

    def _judge(self, mutant: Mutant, raw: bytes, image: Any, error: Exception | None, opened: set[Path],
               clean_types: tuple) -> tuple[str, str]:
        outside = sorted(str(p) for p in opened if p.is_relative_to(self.canary))
        if outside:
            return "silent", f"opened outside the bundle: {outside[:2]}"
        if error is not None:
            msg = str(error)
            if not isinstance(error, clean_types):
                return "raw", f"{type(error).__name__}: {msg[:200]}"
            if not any(w in msg for w in mutant.names):
                return "unnamed", f"{type(error).__name__} without {mutant.names}: {msg[:200]}"
            return "clean", msg[:200]
        unverified = self._unverified(raw, opened)
        if unverified:
            return "silent", f"opened files without a matching files record: {unverified}"
        if mutant.must_fail:
            return "silent", "generated although the mutant is invalid"
        img = np.asarray(image)
        if img.shape != (1, SIZE, SIZE, 3) or not np.isfinite(img).all():
            return "silent", f"wrong image: shape {img.shape}"
        if not mutant.relevant and np.abs(img - self.want).max() > 1e-3:
            return "silent", f"image differs from the unmutated bundle's by {np.abs(img - self.want).max():.3g}"
        return "ok", ""

    def _unverified(self, raw: bytes, opened: set[Path]) -> list[str]:
        try:
            files = json.loads(raw).get("files")
        except (ValueError, RecursionError, AttributeError):
            files = None
        out = []
        for p in opened:
            rel = p.relative_to(self.root).as_posix() if p.is_relative_to(self.root) else None
            if rel in (None, ".", "manifest.json") or p.is_dir():
                continue
            rec = files.get(rel) if isinstance(files, dict) else None
            if rec != self.base["files"].get(rel):
                out.append(rel)
        return sorted(out)

    def close(self) -> None:
        self.watch.close()


# -- the tests ---------------------------------------------------------------------------------------

try:
    import pytest
except ImportError:  # pragma: no cover - script mode without pytest
    pytest = None

if pytest is not None and __name__ != "__main__":
    @pytest.fixture(scope="module")
    def harness(tiny_fp32_bundle, tmp_path_factory):
        if not sys.platform.startswith("linux"):
            pytest.skip("the open watch uses inotify (Linux)")
        h = Harness(tiny_fp32_bundle, tmp_path_factory.mktemp("fuzz"))
        yield h
        h.close()

    def _mutants(h: Harness) -> list[Mutant]:
        return make_mutants(h.base, h.canary, 320)

    def _check(h: Harness, mutants: list[Mutant]) -> None:
        bad = []
        for m in mutants:
            outcome, detail = h.run(m)
            if outcome not in ("ok", "clean"):
                bad.append(f"{outcome}: {m.name}: {detail}")
        assert not bad, f"{len(bad)} of {len(mutants)} mutants neither load nor fail cleanly:\n" + "\n".join(bad[:30])

    def test_mutants_enough_and_deterministic(harness):
        ms = _mutants(harness)
        assert len(ms) >= 300 and len({m.name for m in ms}) == len(ms)
        assert [m.name for m in ms] == [m.name for m in _mutants(harness)]
        ops = Counter(m.name.split()[0] for m in ms)
        assert {"delete", "retype", "negative", "huge", "nan", "inf", "dtype", "garbage", "dotdot", "absolute",
                "symlink"} <= set(ops), ops

    def test_watch_sees_onnxruntime_open_outside(harness):
        """The canary works: onnxruntime opening a file in the canary folder is seen."""
        import onnxruntime as ort

        ort.InferenceSession(str(harness.canary / "vae_decoder.onnx"), providers=["CPUExecutionProvider"])
        assert harness.canary / "vae_decoder.onnx" in harness.watch.opened()

    def test_unmutated_bundle_is_ok(harness):
        assert harness.run(Mutant("unmutated", write=lambda d: json.dumps(d).encode())) == ("ok", "")

    def test_schema_agrees_with_the_runtime():
        """The shipped schema's constants are the runtime's (one list each, checked here)."""
        from ldm_runtime.backends.onnxruntime import _ORT_TYPES
        from ldm_runtime.manifest import COMPONENTS, SCHEMA, SCHEMA_VERSION, schema_file

        schema = json.loads(schema_file().read_text(encoding="utf-8"))
        props = schema["properties"]
        assert props["schema"]["const"] == SCHEMA and props["schema_version"]["const"] == SCHEMA_VERSION
        assert tuple(props["components"]["propertyNames"]["enum"]) == COMPONENTS
        dtypes = schema["definitions"]["tensor"]["properties"]["dtype"]["enum"]
        assert sorted(dtypes) == sorted(np.dtype(t).name for t in _ORT_TYPES.values())

    @pytest.mark.parametrize("path, value, message", [
        (("latent", "scaling_factor"), -1, "manifest field latent.scaling_factor: must be bigger than 0, got -1"),
        (("latent", "vae_scale_factor"), 0, "manifest field latent.vae_scale_factor: must be one of [1, 2, 4, 8, 16, 32, 64], got 0"),
        (("latent", "shift_factor"), 1e300, "manifest field latent.shift_factor: expected a float32 number"),
        (("files", "unet.onnx", "bytes"), "12", "manifest field files.unet.onnx.bytes: must be integer, got '12'"),
        (("components", "unet", "inputs", 0, "dtype"), "float64",
         "manifest field components.unet.inputs[0].dtype: must be one of ['float32', 'float16', 'int64', 'int32'], got 'float64'"),
        (("components", "unet", "inputs", 0, "shape", 1), 3,
         "manifest field components.unet.inputs[0].shape[1]: 'sample' has 3 there, but latent.channels is 4"),
        (("scheduler", "config", "beta_end"), -5, "manifest field scheduler.config.beta_end: scheduler config beta_end=-5: expected a variance in (0, 1)"),
        (("scheduler", "config", "num_train_timesteps"), math.nan, "manifest field scheduler.config.num_train_timesteps: expected a finite number, got nan"),
        (("tokenizer", "merges"), "../../etc/passwd", "manifest field tokenizer.merges: must match pattern"),
        (("default_size", "width"), 60, "manifest field default_size.width: expected a multiple of latent.vae_scale_factor 8, got 60"),
    ])
    def test_errors_name_the_field_and_what_arrived(tiny_fp32_bundle, path, value, message):
        from ldm_runtime.manifest import BundleError, check_manifest

        data = json.loads((tiny_fp32_bundle / "manifest.json").read_text())
        _setter(path, value)(data)
        with pytest.raises(BundleError) as e:
            check_manifest(data, "m.json")
        assert str(e.value).startswith("m.json: " + message), str(e.value)

    def test_clean_errors_for_unreadable_manifests(tmp_path):
        """Not UTF-8, nested past Python's recursion limit, an integer past int()'s digit limit, too big."""
        from ldm_runtime.manifest import BundleError, read_manifest

        cases = {b'{"schema": "\xe9"}'.replace(b"\\xe9", b"\xe9"): "not UTF-8", b"[" * 100000 + b"]" * 100000:
                 "nested too deeply", b'{"a": ' + b"9" * 5000 + b"}": "not valid JSON",
                 b" " * (17 << 20): "larger than 16 MiB", b"[1]": "expected a manifest of schema"}
        for raw, message in cases.items():
            (tmp_path / "manifest.json").write_bytes(raw)
            with pytest.raises(BundleError, match=message):
                read_manifest(tmp_path / "manifest.json")

    @pytest.mark.parametrize("change, message", [
        (dict(name="z"), r"components.vae_decoder.inputs names \['z'\]; the graph's inputs are \['latent'\]"),
        (dict(dtype="float16"), r"inputs\[0\].dtype: 'latent' is 'float16' in the manifest, tensor\(float\) in the graph"),
        (dict(shape=("B", 4, "h")), r"inputs\[0\].shape: 'latent' is \['B', 4, 'h'\] in the manifest"),
        (dict(shape=("B", 4, "h", 7)), r"inputs\[0\].shape: 'latent' is \['B', 4, 'h', 7\] in the manifest"),
        (dict(shape=("B", 3, "h", "w")), r"inputs\[0\].shape: 'latent' is \['B', 3, 'h', 'w'\] in the manifest"),
    ])
    def test_graph_check_at_open(tiny_fp32_bundle, change, message):
        """Declared names, dtypes and shapes are checked against the graph when its session opens."""
        from dataclasses import replace

        from ldm_runtime.backends.onnxruntime import OnnxRuntimeEngine
        from ldm_runtime.manifest import BundleError, Manifest

        info = Manifest.load(tiny_fp32_bundle).component("vae_decoder")
        path = tiny_fp32_bundle / info.file
        OnnxRuntimeEngine(path, info.inputs, info.outputs, name="vae_decoder")  # as declared: it opens
        with pytest.raises(BundleError, match=message):
            OnnxRuntimeEngine(path, (replace(info.inputs[0], **change),), info.outputs, name="vae_decoder")

    def test_fuzz_fast(harness):
        _check(harness, _mutants(harness)[:FAST])

    @pytest.mark.slow
    def test_fuzz_all(harness):
        _check(harness, _mutants(harness)[FAST:])


# -- script mode -------------------------------------------------------------------------------------

def tiny_bundle(out: Path) -> Path:
    """The tiny test bundle (tests/conftest.py's models), exported once to ``out``."""
    if not (out / "manifest.json").is_file():
        sys.path.insert(0, str(Path(__file__).parent))
        from conftest import tiny_latent_diffusion

        from export.bundle import export_bundle
        from training.checkpoint import save_checkpoint

        ckpt = save_checkpoint(tiny_latent_diffusion(), out.with_name(out.name + "-ckpt"))
        export_bundle(ckpt, out, precision="fp32")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("-n", type=int, default=320)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--show", default="raw,unnamed,silent,crash,data loss", help="outcomes to list, comma-separated")
    ap.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)  # worker: first mutant
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    bundle = args.bundle or tiny_bundle(Path("/tmp/ldm-fuzz-tiny"))
    if args.worker:
        return _worker(bundle, args)
    import ldm_runtime

    print(f"runtime: {Path(ldm_runtime.__file__).parent}; bundle: {bundle}; {args.n} mutants, seed {args.seed}")
    counts: Counter = Counter()
    start = 0
    while start < args.n:  # a worker that dies (a crash) is restarted after the mutant it died on
        cmd = [sys.executable, __file__, "--worker", "--bundle", str(bundle), "-n", str(args.n), "--seed",
               str(args.seed), "--start", str(start), "--show", args.show]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        for line in proc.stdout:
            if line.startswith("@"):
                index, outcome = line[1:].split(" ", 1)
                counts[outcome.strip()] += 1
                start = int(index) + 1
            else:
                print(line, end="")
        if proc.wait() != 0 and start < args.n:
            print(f"[{start}] crash: worker exited with {proc.returncode}")
            counts["crash"] += 1
            start += 1
    print("counts: " + ", ".join(f"{o} {counts[o]}" for o in OUTCOMES) + f" (total {sum(counts.values())})")
    return 0


def _worker(bundle: Path, args) -> int:
    import logging
    import tempfile

    logging.disable(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="ldm-fuzz-") as work:
        h = Harness(bundle, Path(work))
        mutants = make_mutants(h.base, h.canary, args.n, args.seed)
        show = set(args.show.split(","))
        for i in range(args.start, len(mutants)):
            outcome, detail = h.run(mutants[i])
            if outcome in show:
                print(f"[{i}] {outcome}: {mutants[i].name}: {detail}", flush=True)
            print(f"@{i} {outcome}", flush=True)
        h.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
