"""Shared use (issue 15 point 5): several threads or processes on one output path, one cache,
one fresh pipeline, one export target; and an export killed between its two renames.

The oracles: a sequential run (same seeds, same bytes), the cache's encoder itself, counts of
engine openings, and the bundles' own manifests.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from export.bundle import _move_into_place, is_bundle, recover_swap
from ldm_runtime import guidance, pipeline
from ldm_runtime.images import read_parameters, save_png
from ldm_runtime.manifest import MANIFEST_NAME, SCHEMA, Manifest
from ldm_runtime.pipeline import Pipeline

REPO = Path(__file__).resolve().parents[1]
THREADS = 8


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _together(fn, n: int = THREADS) -> list:
    """Run ``fn(i)`` for i in range(n) on n threads released at once; the results in order."""
    start = threading.Barrier(n)

    def run(i):
        start.wait()
        return fn(i)

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(run, range(n)))


# ---------------------------------------------------------------------------------------------
# one output path


def test_saves_to_one_path_race_cleanly(tmp_path):
    path = tmp_path / "same.png"
    images = [np.full((16, 16, 3), i / THREADS, dtype=np.float32) for i in range(THREADS)]

    def save(i):
        for k in range(25):
            save_png(images[i], path, {"writer": i, "k": k})

    _together(save)
    with Image.open(path) as im:
        im.load()  # a truncated or mixed PNG fails here
        pixel = np.asarray(im)[0, 0, 0]
    writer = read_parameters(path)["writer"]
    assert pixel == round(writer / THREADS * 255)  # the pixels and the text chunk of one save
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same.png"]  # no temporary left


_SAVER = """
import sys
import numpy as np
from ldm_runtime.images import save_png
i = int(sys.argv[2])
for k in range(40):
    save_png(np.full((8, 8, 3), i / 4, dtype=np.float32), sys.argv[1], {"writer": i})
"""


@pytest.mark.slow
def test_processes_saving_to_one_path(tmp_path):
    path = tmp_path / "same.png"
    procs = [subprocess.Popen([sys.executable, "-c", _SAVER, str(path), str(i)], cwd=REPO, stderr=subprocess.PIPE)
             for i in range(4)]
    errors = [p.communicate()[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, errors
    with Image.open(path) as im:
        im.load()
    assert read_parameters(path)["writer"] in range(4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same.png"]


def test_saved_png_follows_the_umask(tmp_path):
    path = save_png(np.zeros((4, 4, 3), dtype=np.float32), tmp_path / "a.png")
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()


# ---------------------------------------------------------------------------------------------
# the negative-prompt cache


@pytest.fixture
def frequent_thread_switches():
    """Switch threads every microsecond (default 5 ms), so that races show within a short test."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


@pytest.mark.slow
@pytest.mark.parametrize("maxsize", [0, 3])  # 0: no caching (bench's "before"); 3: constant eviction
def test_embedding_cache_under_thread_stress(maxsize, frequent_thread_switches):
    cache = guidance.EmbeddingCache(maxsize=maxsize)

    def encode(rows: np.ndarray) -> np.ndarray:  # the oracle: a row's embedding is its ids, scaled
        return np.repeat(rows[:, :, None].astype(np.float32) * 0.5, 2, axis=2)

    keys = np.arange(10 * 4, dtype=np.int64).reshape(10, 4)

    def hammer(i):
        rng = np.random.default_rng(i)
        for _ in range(1000):
            ids = keys[rng.integers(0, len(keys), size=3)]
            np.testing.assert_array_equal(cache.encode(ids, encode), encode(ids))
        return True

    assert _together(hammer) == [True] * THREADS
    assert len(cache) <= maxsize and cache.misses > 0 and (cache.hits > 0) == (maxsize > 0)


# ---------------------------------------------------------------------------------------------
# a fresh pipeline shared by threads


def test_engines_open_once_for_threads_sharing_a_fresh_pipeline(tiny_fp32_bundle, monkeypatch):
    reference = Pipeline.load(tiny_fp32_bundle, threads=1)
    want = [reference("a cat", num_inference_steps=2, seed=i, output_type="np").images for i in range(THREADS)]

    opened = []
    real = pipeline.load_engine

    def counting(manifest, component, *args, **kwargs):
        opened.append(component)
        return real(manifest, component, *args, **kwargs)

    monkeypatch.setattr(pipeline, "load_engine", counting)
    pipe = Pipeline.load(tiny_fp32_bundle, threads=1)
    got = _together(lambda i: pipe("a cat", num_inference_steps=2, seed=i, output_type="np").images)
    assert sorted(opened) == ["text_encoder", "unet", "vae_decoder"]
    for i in range(THREADS):
        np.testing.assert_array_equal(got[i], want[i])  # sharing changes no byte


# ---------------------------------------------------------------------------------------------
# the export's swap


def _fake_bundle(path: Path, tag: str) -> Path:
    """A folder that ``is_bundle`` accepts, told apart by ``tag``."""
    path.mkdir(parents=True)
    (path / MANIFEST_NAME).write_text(json.dumps({"schema": SCHEMA, "tag": tag}))
    (path / "weights.bin").write_bytes(tag.encode() * 100)
    return path


def _tag(path: Path) -> str:
    return json.loads((path / MANIFEST_NAME).read_text())["tag"]


def test_exports_racing_at_the_final_rename(tmp_path):
    out = _fake_bundle(tmp_path / "out", "first")
    for rnd in range(5):
        tmps = [_fake_bundle(tmp_path / f"out.tmp-{os.getpid()}-{rnd}-{i}", f"{rnd}-{i}") for i in range(THREADS)]
        _together(lambda i: _move_into_place(tmps[i], out))  # raises here if any swap failed
        assert _tag(out) in {f"{rnd}-{i}" for i in range(THREADS)}
        assert (out / "weights.bin").read_bytes() == _tag(out).encode() * 100  # one export's files, whole
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no OUT.old-*, no temporaries


_KILLED_SWAP = """
import os, signal, sys
from pathlib import Path
from export import bundle

real = os.replace
def replace(src, dst):
    real(src, dst)
    if Path(dst).name.startswith(Path(sys.argv[2]).name + ".old-"):  # OUT renamed away: die before the new one moves in
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
bundle._move_into_place(Path(sys.argv[1]), Path(sys.argv[2]))
"""


def _kill_mid_swap(new: Path, out: Path) -> None:
    r = subprocess.run([sys.executable, "-c", _KILLED_SWAP, str(new), str(out)], cwd=REPO,
                       capture_output=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()[-2000:]


@pytest.mark.slow
def test_swap_killed_between_renames_is_recovered(tiny_fp32_bundle, tmp_path):
    out = tmp_path / "bundle"
    shutil.copytree(tiny_fp32_bundle, out)
    new = _fake_bundle(tmp_path / "bundle.tmp-1-x", "new")
    _kill_mid_swap(new, out)
    hidden = [p.name for p in tmp_path.iterdir() if ".old-" in p.name]
    assert not out.exists() and len(hidden) == 1  # the state the kill leaves: what the rule repairs
    assert recover_swap(out) == tmp_path / hidden[0]
    Manifest.load(out)  # the old bundle is back, every file verified
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "bundle.tmp-1-x"]


@pytest.mark.slow
def test_next_export_finishes_a_killed_swap(tmp_path):
    out = _fake_bundle(tmp_path / "out", "old")
    _kill_mid_swap(_fake_bundle(tmp_path / "out.tmp-1-a", "killed"), out)
    assert not out.exists()
    _move_into_place(_fake_bundle(tmp_path / "out.tmp-2-b", "next"), out)  # restores the old, then replaces it
    assert _tag(out) == "next" and sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.tmp-1-a"]


def test_recovery_deletes_a_leftover_once_the_new_bundle_is_in(tmp_path):
    out = _fake_bundle(tmp_path / "out", "new")
    _fake_bundle(tmp_path / "out.old-123-swap", "old")  # killed while deleting the replaced bundle
    assert recover_swap(out) is None
    assert _tag(out) == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert is_bundle(out)


def test_export_output_follows_the_umask(tiny_fp32_bundle):
    umask = _umask()
    folders = [tiny_fp32_bundle, *(p for p in tiny_fp32_bundle.rglob("*") if p.is_dir())]
    files = [p for p in tiny_fp32_bundle.rglob("*") if p.is_file()]
    assert {oct(p.stat().st_mode & 0o777) for p in folders} == {oct(0o777 & ~umask)}
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o666 & ~umask)}  # manifest.json included


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
