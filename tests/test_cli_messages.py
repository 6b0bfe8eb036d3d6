"""Messages that help (issue 15 point 6): ``ldm generate`` and ``ldm export`` answer bad input with
one line on stderr and exit 2, a failed run or an internal error with one line and exit 1 (the
traceback only with ``--debug``); never a traceback for bad input.

Subprocess runs of ``python -m ldm_runtime generate`` / ``python -m export``, as a user runs
them; each costs an interpreter start (the export ones import torch), so they are few. In-process:
``--out`` forms, internal errors of the export, and ``NonFiniteOutputError``'s named causes.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ldm_runtime.generate import main as generate_main
from ldm_runtime.images import read_parameters
from ldm_runtime.pipeline import NonFiniteOutputError, Pipeline

REPO = Path(__file__).resolve().parents[1]

# patches one function to raise, then runs the command: an unexpected internal error
_BROKEN = """
import sys
import {module} as m
def broken(*a, **k):
    raise ZeroDivisionError("injected")
m.{name} = broken
from ldm_runtime.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _run(*args, broken: tuple[str, str] | None = None, cwd: Path = REPO) -> tuple[int, list[str]]:
    """Run an ``ldm`` command; (exit status, the non-empty stderr lines)."""
    argv = ([sys.executable, "-c", _BROKEN.format(module=broken[0], name=broken[1])] if broken
            else [sys.executable, "-m", "ldm_runtime"])
    r = subprocess.run([os.fsencode(str(a)) if not isinstance(a, bytes) else a for a in [*argv, *args]],
                       cwd=cwd, capture_output=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    return r.returncode, [ln for ln in r.stderr.decode(errors="backslashreplace").splitlines() if ln.strip()]


def _one_line(lines: list[str]) -> str:
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]


# ---------------------------------------------------------------------------------------------
# ldm generate


@pytest.mark.slow
def test_generate_bad_bundle(tmp_path):
    code, err = _run("generate", tmp_path / "nothing-here", "a cat", "--out", tmp_path / "a.png")
    line = _one_line(err)
    assert code == 2 and line.startswith("ldm generate: error:") and "nothing-here" in line


@pytest.mark.slow
def test_generate_lone_surrogate_prompt(tiny_fp32_bundle, tmp_path):
    # an undecodable byte on the command line arrives as the lone surrogate "\udc80"
    code, err = _run("generate", tiny_fp32_bundle, b"a \x80 cat", "--steps", "1", "--out", tmp_path / "a.png")
    line = _one_line(err)
    assert code == 2 and "prompt" in line and "surrogate" in line
    assert not (tmp_path / "a.png").exists()


@pytest.mark.slow
def test_generate_out_file_as_folder_refused_before_the_bundle_is_read(tmp_path):
    (tmp_path / "pic.png").write_bytes(b"not mine to replace")
    # the bundle does not exist either: the --out error wins, so --out is checked first
    code, err = _run("generate", tmp_path / "no-bundle", "a cat", "--out", f"{tmp_path / 'pic.png'}/")
    line = _one_line(err)
    assert code == 2 and "--out" in line and "not a folder" in line
    assert (tmp_path / "pic.png").read_bytes() == b"not mine to replace"


@pytest.mark.slow
def test_generate_guidance_scale_beyond_float32(tiny_fp32_bundle, tmp_path):
    code, err = _run("generate", tiny_fp32_bundle, "a cat", "--steps", "1", "--guidance-scale", "1e39",
                     "--out", tmp_path / "a.png")
    line = _one_line(err)  # no numpy overflow warning either: refused before any model runs
    assert code == 2 and "guidance_scale" in line and "float32" in line and "1e+39" in line


class NaNEngine:
    """Stands in for an engine whose outputs are all NaN; declares the real engine's inputs."""

    def __init__(self, real):
        self.inputs, self.outputs = real.inputs, real.outputs

    def run(self, feeds):
        return {o.name: np.full([1, 3, 8, 8], np.nan, dtype=np.float32) for o in self.outputs}


@pytest.mark.parametrize("precision, setting, words", [
    ("fp32", None, ("fp32", "not fp16 overflow")),
    ("fp32", ("scaling_factor", float("nan")), ("non-finite config value", "scaling_factor=nan")),
    ("fp16", None, ("fp16 overflow", "try an fp32 bundle")),
])
def test_nonfinite_output_names_the_likely_cause(tiny_fp32_bundle, precision, setting, words):
    pipe = Pipeline.load(tiny_fp32_bundle, threads=1)
    pipe.manifest.data["precision"] = precision  # this pipeline's own copy of the manifest
    if setting:
        setattr(pipe, *setting)
    pipe.engines["vae_decoder"] = NaNEngine(pipe.engine("vae_decoder"))
    with pytest.raises(NonFiniteOutputError) as e:
        pipe("a cat", num_inference_steps=1, seed=0)
    msg = str(e.value)
    assert "vae_decoder" in msg and all(w in msg for w in words), msg
    assert ("try an fp32 bundle" in msg) == (precision == "fp16"), msg  # fp16 is blamed on fp16 bundles only


@pytest.mark.slow
@pytest.mark.parametrize("debug", [False, True])
def test_generate_internal_error(tiny_fp32_bundle, tmp_path, debug):
    code, err = _run("generate", tiny_fp32_bundle, "a cat", "--out", tmp_path / "a.png", *(["--debug"] * debug),
                     broken=("ldm_runtime.pipeline", "Pipeline.__call__"))
    assert code == 1
    if debug:  # the traceback, then the one line
        assert err[0].startswith("Traceback") and "ZeroDivisionError: injected" in err[-2]
    else:
        _one_line(err)
    assert err[-1].startswith("ldm generate: internal error: ZeroDivisionError: injected")


def test_generate_out_with_trailing_slash_is_a_folder(tiny_fp32_bundle, tmp_path, capsys):
    out = tmp_path / "pic.png"
    assert generate_main([str(tiny_fp32_bundle), "a cat", "--steps", "1", "--seed", "7", "--out", f"{out}/"]) == 0
    assert out.is_dir() and [p.name for p in out.iterdir()] == ["ldm-7-0.png"]
    assert read_parameters(out / "ldm-7-0.png")["seed"] == 7
    assert capsys.readouterr().out.split() == [str(out / "ldm-7-0.png")]


@pytest.mark.parametrize("out, existing, words", [
    ("pic.png", "folder", ("is a folder", "'/'")),      # a folder where the file should go
    ("pics", "file", ("is a file, not a folder",)),     # a file where the folder should go
    ("pics/more", "file", ("is a file, not a folder",)),
])
def test_generate_out_refused_before_the_bundle_is_read(tmp_path, capsys, out, existing, words):
    first = tmp_path / out.split("/")[0]
    if existing == "folder":
        first.mkdir()
    else:
        first.write_bytes(b"mine")
    assert generate_main([str(tmp_path / "no-bundle"), "a cat", "--out", str(tmp_path / out)]) == 2
    line = _one_line(capsys.readouterr().err.splitlines())
    assert all(w in line for w in words), line


# ---------------------------------------------------------------------------------------------
# ldm export


def _broken_copy(src: Path, dest: Path, edit) -> Path:
    shutil.copytree(src, dest)
    edit(dest)
    return dest


def _bad_merges(ckpt: Path) -> None:
    (ckpt / "tokenizer" / "merges.txt").write_text("#version: 0.2\nthis line has three\n")


def _bad_scheduler(ckpt: Path) -> None:
    path = ckpt / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "prediction_type": "x0"}))


@pytest.mark.parametrize("edit, words", [(_bad_merges, ("tokenizer", "merges.txt")),
                                         (_bad_scheduler, ("scheduler", "prediction_type"))])
@pytest.mark.slow
def test_export_refuses_what_generate_would_refuse(tiny_checkpoint_dir, tmp_path, edit, words):
    src = _broken_copy(tiny_checkpoint_dir, tmp_path / "ckpt", edit)
    out = tmp_path / "out" / "bundle"
    code, err = _run("export", src, out)
    line = _one_line(err)
    assert code == 2 and line.startswith("ldm export: error:") and all(w in line for w in words)
    assert not (tmp_path / "out").exists()  # before anything was written


@pytest.mark.parametrize("debug", [False, True])
def test_export_internal_error(tiny_checkpoint_dir, tmp_path, monkeypatch, capsys, debug):
    import export.bundle
    from export.cli import export_main

    def broken(*a, **k):
        raise ZeroDivisionError("injected")

    monkeypatch.setattr(export.bundle, "export_bundle", broken)
    assert export_main([str(tiny_checkpoint_dir), str(tmp_path / "out"), "-q", *(["--debug"] * debug)]) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert err[-1].startswith("ldm export: internal error: ZeroDivisionError: injected")
    assert (err[0].startswith("Traceback") and len(err) > 2) if debug else len(err) == 1
