"""A bundle is untrusted input: every path stays inside it, every file read is listed and hashed
when it is read, errors never show a file's content, and ``ldm verify`` reports each problem.

Reads outside the bundle are caught with a canary FIFO beside it: a thread holds its write end
open-pending, so any open of it for reading (from Python or from onnxruntime's C++) is seen; a
regular canary file beside it carries a token that must never appear in an error.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ldm_runtime.backends import engine_options
from ldm_runtime.backends.onnx_wire import WireError, external_data_locations
from ldm_runtime.backends.onnxruntime import OnnxRuntimeEngine
from ldm_runtime.cli import main as ldm_main
from ldm_runtime.manifest import MANIFEST_NAME, BundleError, Manifest, record_file
from ldm_runtime.pipeline import Img2ImgPipeline, Pipeline, files_in_use, verify_files
from ldm_runtime.verify import verify_bundle

TOKEN = "CANARY-7f3a-never-shown"


class Canary:
    """``fifo`` and ``text`` outside the bundle; ``opened`` tells whether anything opened the FIFO."""

    def __init__(self, folder: Path):
        folder.mkdir()
        self.fifo, self.text = folder / "canary.fifo", folder / "canary.txt"
        self.text.write_text(f"{TOKEN} {TOKEN}\n" * 3)
        os.mkfifo(self.fifo)
        self.done = threading.Event()
        self.opened = False
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        with open(self.fifo, "wb"):  # returns once someone opens the FIFO for reading
            self.opened = not self.done.is_set()

    def close(self) -> bool:
        """Release the watcher (by opening the FIFO ourselves) and say whether anyone else opened it."""
        self.done.set()
        fd = os.open(self.fifo, os.O_RDONLY | os.O_NONBLOCK)
        self.thread.join(timeout=10)
        os.close(fd)
        return self.opened


@pytest.fixture
def canary(tmp_path):
    c = Canary(tmp_path / "outside")
    yield c
    assert not c.close(), "something opened the canary outside the bundle"


def copy_bundle(src: Path, dst: Path) -> Path:
    """A copy to mutate: files hard-linked (never written in place here), manifest.json a real copy."""
    shutil.copytree(src, dst, copy_function=os.link)
    (dst / MANIFEST_NAME).unlink()
    shutil.copy(src / MANIFEST_NAME, dst / MANIFEST_NAME)
    return dst


def real_copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def manifest_of(bundle: Path) -> dict:
    return json.loads((bundle / MANIFEST_NAME).read_text())


def write_manifest(bundle: Path, data: dict) -> None:
    (bundle / MANIFEST_NAME).write_text(json.dumps(data))


def open_everything(m: Manifest, cpu_variant: bool = True) -> Pipeline:
    """What ``Img2ImgPipeline.load`` does after the manifest is read, then every engine opened: the
    runtime's own checks, without the manifest schema in front of them."""
    cls = Img2ImgPipeline
    verify_files(m, files_in_use(m, cls.required_components, "onnxruntime", "cpu", cpu_variant))
    p = cls(m, options=engine_options("onnxruntime", threads=1, cpu_variant=cpu_variant))
    p.open_engines()
    return p


# -- one place: Manifest.path ----------------------------------------------------------------------

@pytest.mark.parametrize("rel, why", [
    ("../x", "'..'"), ("tokenizer/../../x", "'..'"), ("/etc/passwd", "absolute"), ("", "empty"),
    ("a\0b", "NUL"), (5, "got int"), (None, "got null"), (["a"], "got list"),
])
def test_path_refuses_what_leaves_the_bundle(tmp_path, rel, why):
    m = Manifest(root=tmp_path, data={"files": {}})
    with pytest.raises(BundleError, match=rf"manifest field components\.unet\.file = .*{why}"):
        m.path(rel, field="components.unet.file")


def test_path_follows_symlinks(tmp_path, canary):
    root = tmp_path / "b"
    (root / "sub").mkdir(parents=True)
    (root / "real.txt").write_text("x")
    os.symlink(root / "real.txt", root / "sub" / "inside.txt")  # inside: fine
    os.symlink(canary.fifo, root / "out.fifo")
    os.symlink(canary.fifo.parent, root / "outdir")
    m = Manifest(root=root, data={"files": {}})
    assert m.path("sub/inside.txt", "f") == (root / "real.txt").resolve()
    for rel in ("out.fifo", "outdir/canary.fifo", "outdir/canary.txt"):
        with pytest.raises(BundleError, match=rf"field tokenizer\.vocab = '{rel}'.*symlink"):
            m.path(rel, field="tokenizer.vocab")


# -- every field kind, with and without the manifest schema in front ---------------------------------

def _set(data: dict, field: str, value) -> None:
    """Set a dotted manifest field (``components.unet.cpu_variant.external_data[0]``) to ``value``."""
    *parents, last = field.split(".")
    node = data
    for key in parents:
        node = node[key]
    if last.endswith("]"):
        key, index = last[:-1].split("[")
        node[key][int(index)] = value
    else:
        node[last] = value


FIELDS = ["tokenizer.vocab", "tokenizer.merges", "components.unet.file", "components.unet.cpu_variant.file",
          "components.unet.cpu_variant.external_data[0]", "components.vae_encoder.external_data[0]"]


def _attacks(bundle: Path, canary: Canary) -> dict[str, str]:
    os.symlink(canary.fifo, bundle / "link.fifo")
    os.symlink(canary.text, bundle / "link.txt")
    depth = len(bundle.resolve().parts)
    return {"dotdot": "../outside/canary.fifo", "deep-dotdot": "../" * depth + str(canary.text)[1:],
            "absolute": str(canary.fifo), "symlink-fifo": "link.fifo", "symlink-text": "link.txt"}


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("schema", [True, False], ids=["load", "runtime-only"])
def test_every_path_field_is_contained(tiny_fp32_bundle, tmp_path, canary, field, schema):
    bundle = copy_bundle(tiny_fp32_bundle, tmp_path / "b")
    for name, rel in _attacks(bundle, canary).items():
        data = manifest_of(bundle)
        _set(data, field, rel)
        write_manifest(bundle, data)
        cpu_variant = "cpu_variant" in field or "tokenizer" in field
        with pytest.raises(BundleError) as e:
            if schema:
                Img2ImgPipeline.load(bundle, cpu_variant=cpu_variant).open_engines()
            else:
                open_everything(Manifest(root=bundle, data=data), cpu_variant=cpu_variant)
        msg = str(e.value)
        print(f"{field} {name}: {msg}")
        assert field.split("[")[0] in msg, (name, msg)
        assert TOKEN not in msg and "\n" not in msg


def test_files_entry_outside_is_no_oracle(tiny_fp32_bundle, tmp_path, canary):
    """A ``files`` entry naming an outside file is refused by its name: no size or hash of it comes back.
    A load never opens it (no field names it, so no backend reads it)."""
    bundle = copy_bundle(tiny_fp32_bundle, tmp_path / "b")
    attacks = _attacks(bundle, canary)
    for rel in attacks.values():
        data = manifest_of(bundle)
        data["files"][rel] = {"sha256": "0" * 64, "bytes": 1}
        for load in (lambda: Pipeline.load(bundle, threads=1),  # the schema
                     lambda: Manifest(root=bundle, data=data).verify_files()):  # every file, as ldm verify checks
            write_manifest(bundle, data)
            with pytest.raises(BundleError, match=r"manifest field files") as e:
                load()
            assert "mismatch" not in str(e.value) and "bytes" not in str(e.value)
    open_everything(Manifest(root=bundle, data=data))  # the runtime's own checks: the entry is never read


def test_manifest_symlinked_out_is_refused(tmp_path, canary):
    bundle = tmp_path / "b"
    bundle.mkdir()
    os.symlink(canary.text, bundle / MANIFEST_NAME)
    with pytest.raises(BundleError, match="symlink") as e:
        Pipeline.load(bundle)
    assert TOKEN not in str(e.value)


def test_engine_plan_path_is_contained(tiny_fp32_bundle, tmp_path, canary):
    bundle = copy_bundle(tiny_fp32_bundle, tmp_path / "b")
    m = Manifest.load(bundle, verify=False)
    for rel in _attacks(bundle, canary).values():
        with pytest.raises(BundleError, match=r"engines\.k\.file"):
            m.read_verified(rel, field="engines.k.file")


def test_tokenizer_text_never_echoed(tiny_fp32_bundle, tmp_path):
    """A listed, hashed file that is not a merges file: the error names the field and line, not the text."""
    bundle = copy_bundle(tiny_fp32_bundle, tmp_path / "b")
    (bundle / "tokenizer" / "notes.txt").write_text(f"#version: 0.2\n{TOKEN}\n")
    data = manifest_of(bundle)
    record_file(data, bundle, "tokenizer/notes.txt")
    data["tokenizer"]["merges"] = "tokenizer/notes.txt"
    write_manifest(bundle, data)
    with pytest.raises(BundleError, match=r"manifest field tokenizer: .*notes.txt:2") as e:
        Pipeline.load(bundle)
    assert TOKEN not in str(e.value)


# -- external data the graph names ----------------------------------------------------------------------

def _relocate_external_data(bundle: Path, graph: str, location: str) -> None:
    """Point every external tensor of ``graph`` at ``location`` and re-record the graph's hash."""
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(bundle / graph), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    (bundle / graph).unlink()  # hard-linked: replace, never write through
    onnx.save(model, str(bundle / graph))
    data = manifest_of(bundle)
    record_file(data, bundle, graph)
    write_manifest(bundle, data)


@pytest.mark.parametrize("target", ["../outside/canary.fifo", "CANARY_ABS", "vae_decoder.onnx"])
def test_graph_external_data_must_be_declared(tiny_fp32_bundle, tmp_path, canary, target):
    bundle = copy_bundle(tiny_fp32_bundle, tmp_path / "b")
    location = str(canary.fifo) if target == "CANARY_ABS" else target
    _relocate_external_data(bundle, "vae_decoder.cpu.onnx", location)
    p = Pipeline.load(bundle, threads=1)  # every file matches its hash: only the graph's contents are wrong
    with pytest.raises(BundleError, match=r"components\.vae_decoder\.cpu_variant reads external data .*"
                                          r"does not declare") as e:
        p.engine("vae_decoder")
    print(e.value)


def test_external_data_locations_agree_with_onnx():
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    def external(name, location):
        t = numpy_helper.from_array(np.ones((4,), np.float32), name)
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", location), ("offset", "0"), ("length", "16")):
            t.external_data.add(key=k, value=v)
        return t

    then = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "then", [],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
                             initializer=[external("x", "sub.bin")])
    const = helper.make_node("Constant", [], ["c"], value=external("cv", "const.bin"))
    branch = helper.make_node("If", ["cond"], ["z"], then_branch=then, else_branch=then)
    graph = helper.make_graph([const, branch], "g",
                              [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [4])],
                              initializer=[external("w", "weights.bin"), external("w2", "weights.bin"),
                                           numpy_helper.from_array(np.zeros(3, np.float32), "inline")])
    model = helper.make_model(graph)
    blob = model.SerializeToString()
    from onnx.external_data_helper import _get_all_tensors

    want = list(dict.fromkeys(e.value for t in _get_all_tensors(model) for e in t.external_data if e.key == "location"))
    assert sorted(want) == ["const.bin", "sub.bin", "weights.bin"]
    assert sorted(external_data_locations(blob)) == sorted(want)
    inline = helper.make_graph([], "i", [], [], initializer=[numpy_helper.from_array(np.ones(3, np.float32), "w")])
    assert external_data_locations(helper.make_model(inline).SerializeToString()) == []
    for bad in (blob[:-3], b"\xff" * 12 + b"location", b"\x0f\x01location"):  # truncated, overlong, wire type 7
        with pytest.raises(WireError):
            external_data_locations(bad)


def test_wire_field_numbers_match_onnx():
    onnx = pytest.importorskip("onnx")
    from ldm_runtime.backends.onnx_wire import _FIELDS

    messages = {"model": onnx.ModelProto, "training": onnx.TrainingInfoProto, "graph": onnx.GraphProto,
                "function": onnx.FunctionProto, "node": onnx.NodeProto, "attribute": onnx.AttributeProto,
                "sparse": onnx.SparseTensorProto, "tensor": onnx.TensorProto}
    kinds = {v: k for k, v in {"graph": "GraphProto", "training": "TrainingInfoProto", "function": "FunctionProto",
                               "node": "NodeProto", "attribute": "AttributeProto", "sparse": "SparseTensorProto",
                               "tensor": "TensorProto", "entry": "StringStringEntryProto"}.items()}
    for kind, msg in messages.items():
        fields = {f.number: f for f in msg.DESCRIPTOR.fields if f.message_type}
        for number, child in _FIELDS[kind].items():
            assert kinds[fields[number].message_type.name] == child, (kind, number)
        # every field on the way to a tensor is walked (of the string pairs, only a tensor's external_data)
        leads = {n for n, f in fields.items() if f.message_type.name in kinds
                 and (f.message_type.name != "StringStringEntryProto" or f.name == "external_data")}
        assert leads == set(_FIELDS[kind]), kind


# -- integrity: listed, and hashed when opened -------------------------------------------------------

@pytest.mark.parametrize("drop", ["all", "unet.weights", "tokenizer/merges.txt", "vae_decoder.cpu.onnx"])
def test_every_file_read_must_be_listed(tiny_fp32_bundle, tmp_path, drop):
    bundle = copy_bundle(tiny_fp32_bundle, tmp_path / "b")
    data = manifest_of(bundle)
    if drop == "all":
        data["files"] = {}
    else:
        del data["files"][drop]
    write_manifest(bundle, data)
    for load in (lambda: Pipeline.load(bundle), lambda: open_everything(Manifest(root=bundle, data=data))):
        with pytest.raises(BundleError, match="not listed in the manifest's files"):
            load()


def test_a_record_needs_size_and_hash(tiny_fp32_bundle, tmp_path):
    bundle = copy_bundle(tiny_fp32_bundle, tmp_path / "b")
    data = manifest_of(bundle)
    del data["files"]["unet.cpu.onnx"]["bytes"]
    with pytest.raises(BundleError, match=r"files\['unet.cpu.onnx'\]"):
        open_everything(Manifest(root=bundle, data=data))


@pytest.mark.parametrize("name", ["unet.weights", "unet.cpu.onnx", "text_encoder.weights"])
@pytest.mark.parametrize("how", ["rename", "in-place"])
def test_file_swapped_after_load_is_refused(tiny_fp32_bundle, tmp_path, name, how):
    bundle = real_copy(tiny_fp32_bundle, tmp_path / "b")
    p = Pipeline.load(bundle, threads=1)
    original = (bundle / name).read_bytes()
    changed = bytearray(original)
    changed[len(changed) // 2] ^= 0xFF  # same size: only the hash can tell
    if how == "rename":
        (bundle / "new.tmp").write_bytes(bytes(changed))
        os.replace(bundle / "new.tmp", bundle / name)
    else:
        with open(bundle / name, "r+b") as f:
            f.write(changed)
    with pytest.raises(BundleError, match=rf"{name}: sha256 mismatch"):
        p("a red circle", num_inference_steps=1, output_type="np", seed=0)
    (bundle / name).write_bytes(original)
    out = p("a red circle", num_inference_steps=1, output_type="np", seed=0).images  # restored: runs
    ref = Pipeline.load(tiny_fp32_bundle, threads=1)("a red circle", num_inference_steps=1, output_type="np", seed=0)
    np.testing.assert_array_equal(out, ref.images)


def test_fifo_in_the_bundle_is_refused_not_waited_on(tiny_fp32_bundle, tmp_path):
    bundle = copy_bundle(tiny_fp32_bundle, tmp_path / "b")
    (bundle / "tokenizer" / "merges.txt").unlink()
    os.mkfifo(bundle / "tokenizer" / "merges.txt")
    m = Manifest(root=bundle, data=manifest_of(bundle))
    with pytest.raises(BundleError, match="not a regular file"):
        m.read_verified("tokenizer/merges.txt", "tokenizer.merges")
    with pytest.raises(BundleError, match="not a regular file"):
        Pipeline.load(bundle)


def test_engine_from_verified_bytes_matches_file(tiny_fp32_bundle):
    """The session opened from verified bytes and external data in memory is the same model."""
    import onnxruntime as ort

    m = Manifest.load(tiny_fp32_bundle)
    eng = OnnxRuntimeEngine.from_manifest(m, "vae_decoder")
    x = np.random.default_rng(0).standard_normal((1, 4, 8, 8), dtype=np.float32)
    sess = ort.InferenceSession(str(tiny_fp32_bundle / "vae_decoder.cpu.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(eng.run({"latent": x})["image"], sess.run(["image"], {"latent": x})[0])


@pytest.mark.parametrize("route", ["folder", "memory", "full"])
def test_weights_reach_onnxruntime_from_a_private_folder_that_is_removed(tiny_fp32_bundle, monkeypatch, route):
    """The verified weights go to onnxruntime through a 0700 folder in /dev/shm (removed once the session is
    open), or in memory where there is no /dev/shm or it is full; each gives the model in the bundle, exactly."""
    import errno
    import tempfile

    import onnxruntime as ort

    from ldm_runtime.backends import onnxruntime as backend

    if route in ("folder", "full") and not os.access(backend.SHM, os.W_OK):
        pytest.skip(f"{backend.SHM} is not writable here")
    made: list[tuple[str, int]] = []
    real_mkdtemp = tempfile.mkdtemp

    def mkdtemp(**kw):
        folder = real_mkdtemp(**kw)
        made.append((folder, os.stat(folder).st_mode & 0o777))
        return folder

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    if route == "memory":
        monkeypatch.setattr(backend, "SHM", str(tiny_fp32_bundle / "no-such-folder"))
    if route == "full":
        def no_space(folder, files):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(backend, "write_private", no_space)
    eng = OnnxRuntimeEngine.from_manifest(Manifest.load(tiny_fp32_bundle), "vae_decoder")
    assert [mode for _, mode in made] == ([] if route == "memory" else [0o700])
    assert not any(os.path.exists(folder) for folder, _ in made)
    x = np.random.default_rng(1).standard_normal((1, 4, 8, 8), dtype=np.float32)
    sess = ort.InferenceSession(str(tiny_fp32_bundle / "vae_decoder.cpu.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(eng.run({"latent": x})["image"], sess.run(["image"], {"latent": x})[0])


def test_weights_folders_of_dead_processes_are_swept(tiny_fp32_bundle, tmp_path, monkeypatch):
    """A process killed while its session opened leaves its weights folder in /dev/shm (RAM until reboot):
    the next load removes the folders of processes that are gone once they are an hour old, and leaves
    recent ones (another PID namespace's live process looks gone), live processes' folders, its own, and
    anything not named as ours."""
    from ldm_runtime.backends import onnxruntime as backend

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead = int(done.stdout)  # exited and reaped: no process has this pid now (barring reuse in this instant)
    root = tmp_path / "shm"
    root.mkdir()
    for name in (f"ldm-weights-{dead}-abc", f"ldm-weights-{os.getppid()}-live", f"ldm-weights-{os.getpid()}-own",
                 "ldm-weights-notapid-x", "other-123-x"):
        (root / name).mkdir()
        (root / name / "unet.weights").write_bytes(b"w" * 10)
    (root / f"ldm-weights-{dead}-file").write_bytes(b"not a folder")
    old = time.time() - backend.STALE_AFTER_S - 60
    for name in os.listdir(root):
        os.utime(root / name, (old, old))
    (root / f"ldm-weights-{dead}-recent").mkdir()
    monkeypatch.setattr(backend, "SHM", str(root))
    OnnxRuntimeEngine.from_manifest(Manifest.load(tiny_fp32_bundle), "vae_decoder")
    assert sorted(p.name for p in root.iterdir()) == sorted(
        [f"ldm-weights-{os.getppid()}-live", f"ldm-weights-{os.getpid()}-own", "ldm-weights-notapid-x",
         "other-123-x", f"ldm-weights-{dead}-file", f"ldm-weights-{dead}-recent"])  # and the engine's own is gone


# -- ldm verify ------------------------------------------------------------------------------------

def run_verify(bundle: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ldm_runtime", "verify", str(bundle)], capture_output=True,
                          text=True, timeout=300)


def test_verify_clean_bundle(tiny_fp32_bundle, capsys):
    assert verify_bundle(str(tiny_fp32_bundle)) == []
    assert ldm_main(["verify", str(tiny_fp32_bundle)]) == 0
    assert capsys.readouterr().out.strip() == f"{tiny_fp32_bundle}: ok"


def test_verify_one_line_per_problem(tiny_fp32_bundle, tmp_path):
    bundle = copy_bundle(tiny_fp32_bundle, tmp_path / "b")
    data = manifest_of(bundle)
    data["files"]["vae_encoder.onnx"]["sha256"] = "0" * 64           # 1: a hash that does not match
    del data["files"]["text_encoder.weights"]                         # 2: a referenced file not listed
    (bundle / "unet.onnx").unlink()                                   # 3: a listed file missing
    write_manifest(bundle, data)
    r = run_verify(bundle)
    lines = r.stdout.splitlines()
    print(r.stdout, r.stderr)
    assert r.returncode == 2 and len(lines) == 3, r.stdout
    assert any("vae_encoder.onnx: sha256 mismatch" in ln for ln in lines)
    assert any("'text_encoder.weights' is not listed" in ln for ln in lines)
    assert any("missing file 'unet.onnx'" in ln for ln in lines)


def test_verify_graph_io_against_manifest(tiny_fp32_bundle, tmp_path):
    bundle = copy_bundle(tiny_fp32_bundle, tmp_path / "b")
    data = manifest_of(bundle)
    assert data["components"]["unet"]["inputs"][1]["name"] == "timestep"
    data["components"]["unet"]["inputs"][1]["dtype"] = "int64"                # float32 in the graph
    data["components"]["vae_decoder"]["inputs"][0]["shape"] = ["B", 4, "h"]   # rank 3, the graph's is 4
    data["components"]["text_encoder"]["outputs"][0]["name"] = "hidden"       # not the graph's output name
    write_manifest(bundle, data)
    problems = verify_bundle(str(bundle))
    print("\n".join(problems))
    assert len(problems) == 5  # each in the portable graph and in the CPU variant (the text encoder has none)
    for comp, field in (("unet", "components.unet.inputs[1].dtype"),
                        ("vae_decoder", "components.vae_decoder.inputs[0].shape"),
                        ("text_encoder", "components.text_encoder.outputs")):
        for graph in (f"{comp}.onnx", f"{comp}.cpu.onnx")[: 1 if comp == "text_encoder" else 2]:
            assert sum(f"'{graph}'" in p and field in p for p in problems) == 1, (graph, field)
    r = run_verify(bundle)
    assert r.returncode == 2 and r.stdout.splitlines() == problems


def test_verify_unreadable_manifest(tmp_path):
    r = run_verify(tmp_path)
    assert r.returncode == 2 and len(r.stdout.splitlines()) == 1 and "no manifest.json" in r.stdout
