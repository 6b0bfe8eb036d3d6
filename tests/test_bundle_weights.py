"""Every weight stored once (export/weights.py), the files each backend reads (pipeline.files_in_use,
``ldm verify --backend``), and bundle permissions.

References: the portable graph's own initializers (sizes, bytes), the same graph with its weights
inline (the layout of earlier exports: outputs must be bit-identical), the torch model (the export
gates), and the file sets named by the manifest fields each backend follows.
"""
from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from export.bundle import export_bundle
from export.onnx_export import wrap
from export.optimize import sample_shapes
from export.parity import gate_for, parity_metrics, passes
from export.weights import ALIGN, MIN_EXTERNAL_BYTES, external_ref, save_with_weights, weights_by_digest
from ldm_runtime.backends import engine_options, load_engine
from ldm_runtime.backends.tensorrt import component_onnx_sha256
from ldm_runtime.manifest import MANIFEST_NAME, Manifest, record_file
from ldm_runtime.pipeline import Img2ImgPipeline, Pipeline, files_in_use
from ldm_runtime.verify import main as verify_main
from ldm_runtime.verify import verify_bundle
from training.checkpoint import load_models

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# what a bundle holds besides its weights and its tokenizer (CLIP's, 1.5 MB), for the tiny models: the
# graph protobufs (nodes and the initializers under MIN_EXTERNAL_BYTES; 0.73 MB for fp32 with its CPU
# variants, 0.35 MB for fp16) and the manifest (10 kB)
ALLOWANCE = 1_000_000
TOKENIZER = {"tokenizer/vocab.json", "tokenizer/merges.txt"}


@pytest.fixture(scope="module")
def tiny_fp16_bundle(tiny_checkpoint_dir, tmp_path_factory) -> Path:
    """The tiny checkpoint as an fp16 bundle, exported under umask 022."""
    old = os.umask(0o022)
    try:
        return export_bundle(tiny_checkpoint_dir, tmp_path_factory.mktemp("tiny-fp16") / "bundle", precision="fp16",
                             components="text_encoder,unet,vae_decoder")
    finally:
        os.umask(old)


@pytest.fixture(params=["fp32", "fp16"])
def bundle(request, tiny_fp32_bundle, tiny_fp16_bundle) -> Path:
    return tiny_fp32_bundle if request.param == "fp32" else tiny_fp16_bundle


def _graphs(man: Manifest) -> list[tuple[str, dict]]:
    """(component, manifest entry) of every graph: the portable ones, then the CPU variants."""
    comps = man.data["components"]
    return [*((c, e) for c, e in comps.items()), *((c, e["cpu_variant"]) for c, e in comps.items() if "cpu_variant" in e)]


def _tensor_bytes(t: TensorProto) -> int:
    return int(np.prod(t.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def _light(bundle: Path, rel: str) -> onnx.ModelProto:
    return onnx.load(str(bundle / rel), load_external_data=False)


# -- stored once ------------------------------------------------------------------------------------

def test_bundle_bytes_close_to_weight_bytes(bundle):
    man = Manifest.load(bundle)
    weights = sum(_tensor_bytes(t) for e in man.data["components"].values()
                  for t in _light(bundle, e["file"]).graph.initializer)
    on_disk = {p.relative_to(bundle).as_posix(): p.stat().st_size for p in bundle.rglob("*") if p.is_file()}
    weight_files = sum(n for rel, n in on_disk.items() if rel.endswith(".weights"))
    tokenizer = sum(on_disk[rel] for rel in TOKENIZER)
    rest = sum(on_disk.values()) - weight_files - tokenizer
    total = sum(on_disk.values())
    print(f"{man.precision}: weights {weights} B, weights files {weight_files} B, tokenizer {tokenizer} B, "
          f"graphs and manifest {rest} B; total {total} B = {(total - tokenizer) / weights:.3f}x the weights + tokenizer")
    assert weights > 2 * ALLOWANCE  # a second copy of the weights could not hide in the allowance
    assert weights <= weight_files <= 1.05 * weights  # only page padding added
    assert rest <= ALLOWANCE
    assert total <= 1.05 * weights + tokenizer + ALLOWANCE
    assert set(on_disk) == set(man.data["files"]) | {MANIFEST_NAME}
    for c, e in man.data["components"].items():  # one weights file per component, named in the manifest
        assert e["external_data"] == [f"{c}.weights"]


def test_every_initializer_resolvable_and_page_aligned(bundle):
    man = Manifest.load(bundle)
    for comp, entry in _graphs(man):
        model, external = _light(bundle, entry["file"]), 0
        for t in model.graph.initializer:
            ref = external_ref(t)
            if ref is None:
                assert len(t.raw_data) < MIN_EXTERNAL_BYTES, (entry["file"], t.name)
                continue
            location, offset, length = ref
            assert location in entry["external_data"] and location in man.data["files"], (entry["file"], location)
            assert offset % ALIGN == 0 and length == _tensor_bytes(t), (entry["file"], t.name, offset)
            assert offset + length <= (bundle / location).stat().st_size
            external += 1
        print(f"{entry['file']}: {external} initializers external, {len(model.graph.initializer) - external} inline")
        assert external > 0


def test_cpu_variant_reads_the_portable_weights(tiny_fp32_bundle):
    man = Manifest.load(tiny_fp32_bundle)
    variants = {c: e for c, e in man.data["components"].items() if "cpu_variant" in e}
    assert {"unet", "vae_decoder"} <= set(variants)  # both have attention to fuse
    for comp, entry in variants.items():
        var = entry["cpu_variant"]
        portable = {t.name: external_ref(t) for t in _light(tiny_fp32_bundle, entry["file"]).graph.initializer}
        refs = [external_ref(t) for t in _light(tiny_fp32_bundle, var["file"]).graph.initializer]
        shared = [r for r in refs if r is not None]
        print(f"{comp}: variant reads {len(shared)} tensors, all at the portable graph's offsets in {var['external_data']}")
        assert var["external_data"] == entry["external_data"] and var["shares_weights"]
        assert shared and set(shared) <= set(portable.values())  # same file, offset and length


def test_new_initializers_go_to_a_file_of_their_own(tmp_path):
    """A derived graph: tensors equal to the source's point into its file, a new one gets ``<graph>.weights``."""
    rng = np.random.default_rng(0)
    w, v = rng.standard_normal((32, 32), dtype=np.float32), rng.standard_normal((32, 32), dtype=np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])
    src = helper.make_model(helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y],
                                              [numpy_helper.from_array(w, "w")]),
                            opset_imports=[helper.make_opsetid("", 18)])
    assert save_with_weights(src, tmp_path / "m.onnx") == ["m.weights"]
    nodes = [helper.make_node("MatMul", ["x", "w_copy"], ["h"]), helper.make_node("MatMul", ["h", "v"], ["y"])]
    derived = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [numpy_helper.from_array(w, "w_copy"),
                                                                          numpy_helper.from_array(v, "v")]),
                                opset_imports=[helper.make_opsetid("", 18)])
    files = save_with_weights(derived, tmp_path / "m.cpu.onnx", shared=weights_by_digest(tmp_path / "m.onnx"))
    refs = {t.name: external_ref(t) for t in onnx.load(str(tmp_path / "m.cpu.onnx"), load_external_data=False).graph.initializer}
    src_ref = external_ref(onnx.load(str(tmp_path / "m.onnx"), load_external_data=False).graph.initializer[0])
    assert files == ["m.weights", "m.cpu.weights"]
    assert refs["w_copy"] == src_ref and refs["v"] == ("m.cpu.weights", 0, v.nbytes)
    assert (tmp_path / "m.cpu.weights").stat().st_size == v.nbytes
    feed = {"x": rng.standard_normal((1, 32), dtype=np.float32)}
    got = ort.InferenceSession(str(tmp_path / "m.cpu.onnx"), providers=["CPUExecutionProvider"]).run(None, feed)[0]
    np.testing.assert_allclose(got, feed["x"] @ w @ v, rtol=1e-5, atol=1e-5)


# -- the same outputs ---------------------------------------------------------------------------------

def _feeds(man: Manifest, comp: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    shapes = sample_shapes(man.data, comp)
    out = {}
    for s in man.data["components"][comp]["inputs"]:
        shape, dt = shapes[s["name"]], np.dtype(s["dtype"])
        out[s["name"]] = (rng.integers(0, 256, shape).astype(dt) if dt.kind == "i" else
                          np.full(shape, 500.0, dt) if s["name"] == "timestep" else rng.standard_normal(shape).astype(dt))
    return out


def test_outputs_equal_the_inline_layout_and_torch(bundle, tiny_checkpoint_dir, tmp_path):
    """Each graph as the runtime opens it (verified bytes, weights handed over in memory) gives bit for bit
    what the same graph with its weights inline gives (earlier exports' layout), and the portable graph
    meets its export gate against the torch model."""
    man, ld = Manifest.load(bundle), load_models(tiny_checkpoint_dir)
    # onnx.load refuses weights files with several hard links, and other tests hard-link the session
    # bundle's files into their copies: read the inline layout from a real copy
    plain = Path(shutil.copytree(bundle, tmp_path / "copy"))
    for comp, entry in man.data["components"].items():
        feeds = _feeds(man, comp, np.random.default_rng(0))
        for variant in ([False, True] if "cpu_variant" in entry else [False]):
            rel = entry["cpu_variant"]["file"] if variant else entry["file"]
            inline = onnx.load(str(plain / rel)).SerializeToString()  # the external data loaded into the graph
            ref = ort.InferenceSession(inline, providers=["CPUExecutionProvider"]).run(None, feeds)
            eng = load_engine(man, comp, "onnxruntime", "cpu", engine_options("onnxruntime", cpu_variant=variant))
            got = eng.run(feeds)
            names = [o.name for o in eng.outputs]
            for r, name in zip(ref, names):
                np.testing.assert_array_equal(got[name], r, err_msg=rel)
        with torch.no_grad():  # the last engine opened: the CPU variant where there is one
            want = wrap(comp, ld)(*(torch.from_numpy(v.astype(np.float32) if v.dtype.kind == "f" else v)
                                    for v in feeds.values()))
        metric, bound, sense = gate_for(comp, man.precision)
        for w, name in zip([want] if torch.is_tensor(want) else list(want), names):
            value = parity_metrics(comp, w.numpy(), got[name].astype(np.float32))[metric]
            print(f"{man.precision} {comp}.{name}: {metric} {value:.3g} against torch (gate {bound:g})")
            assert passes(value, bound, sense)


# -- the files each backend reads ---------------------------------------------------------------------

@pytest.fixture
def with_plans(tiny_fp32_bundle, tmp_path) -> Path:
    """A copy of the fp32 bundle with TensorRT plan records (random bytes: nothing here opens them): one
    current plan per component, and one stale U-Net plan built from an older graph."""
    b = Path(shutil.copytree(tiny_fp32_bundle, tmp_path / "b"))
    data = json.loads((b / MANIFEST_NAME).read_text())
    plans = {f"{c}-now": (c, component_onnx_sha256(data, c)) for c in data["components"]}
    plans["unet-stale"] = ("unet", "0" * 64)
    data["engines"] = {}
    for key, (comp, onnx_sha) in plans.items():
        rel = f"engines/{key}/{comp}.plan"
        (b / rel).parent.mkdir(parents=True)
        (b / rel).write_bytes(np.random.default_rng(len(key)).bytes(4096))
        rec = record_file(data, b, rel)
        data["engines"][key] = {"component": comp, "file": rel, "sha256": rec["sha256"], "onnx_sha256": onnx_sha,
                                "compute_capability": "9.0", "tensorrt_version": "10.0", "build": {"max_batch": 4}}
    (b / MANIFEST_NAME).write_text(json.dumps(data))
    return b


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """Every bundle file opened through the manifest (``read_verified`` and the hash check both go there)."""
    seen: list[str] = []
    original = Manifest._open_listed

    def spy(self, rel, field):
        seen.append(rel)
        return original(self, rel, field)

    monkeypatch.setattr(Manifest, "_open_listed", spy)
    return seen


# (pipeline, backend, device, cpu_variant) -> the files it reads besides the tokenizer
EXPECTED = {
    (Pipeline, "onnxruntime", "cpu", True): {"text_encoder.onnx", "text_encoder.weights", "unet.cpu.onnx",
                                              "unet.weights", "vae_decoder.cpu.onnx", "vae_decoder.weights"},
    (Pipeline, "onnxruntime", "cpu", False): {"text_encoder.onnx", "text_encoder.weights", "unet.onnx",
                                               "unet.weights", "vae_decoder.onnx", "vae_decoder.weights"},
    (Pipeline, "onnxruntime", "cuda", True): {"text_encoder.onnx", "text_encoder.weights", "unet.onnx",
                                               "unet.weights", "vae_decoder.onnx", "vae_decoder.weights"},
    (Img2ImgPipeline, "onnxruntime", "cpu", True): {"text_encoder.onnx", "text_encoder.weights", "unet.cpu.onnx",
                                                     "unet.weights", "vae_decoder.cpu.onnx", "vae_decoder.weights",
                                                     "vae_encoder.onnx", "vae_encoder.weights"},
    (Pipeline, "tensorrt", "cuda", True): {"engines/text_encoder-now/text_encoder.plan", "engines/unet-now/unet.plan",
                                           "engines/vae_decoder-now/vae_decoder.plan"},
}


@pytest.mark.parametrize("case", list(EXPECTED), ids=lambda c: f"{c[0].__name__}-{c[1]}-{c[2]}-variant{int(c[3])}")
def test_files_in_use_per_backend(with_plans, case):
    cls, backend, device, variant = case
    got = files_in_use(Manifest.load(with_plans, verify=False), cls.required_components, backend, device, variant)
    assert len(got) == len(set(got)) and set(got) == TOKENIZER | EXPECTED[case]


def test_cpu_load_reads_exactly_its_files(with_plans, opened):
    """Loading and opening every engine on onnxruntime CPU reads the tokenizer, the graphs and their weights,
    each once to hash at load and once when opened; never a plan or a portable graph it has a variant for."""
    p = Img2ImgPipeline.load(with_plans, threads=1)
    at_load = set(opened)
    p.open_engines(p.required_components)
    want = TOKENIZER | EXPECTED[(Img2ImgPipeline, "onnxruntime", "cpu", True)]
    print(f"read at load {sorted(at_load)}; {len(opened)} opens in all")
    assert at_load == set(opened) == want
    assert sorted(opened) == sorted([*want, *want])  # hashed at load, read verified when opened


def test_tensorrt_load_hashes_only_plans(with_plans, opened):
    """A TensorRT load (engines open on first use, so no GPU is needed here) hashes the tokenizer and the
    current plans: no ONNX graph, no weights file, no stale plan."""
    Pipeline.load(with_plans, backend="tensorrt", device="cuda")
    assert set(opened) == TOKENIZER | EXPECTED[(Pipeline, "tensorrt", "cuda", True)]


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_verify_per_backend(with_plans, opened, capsys):
    b = with_plans
    assert verify_bundle(str(b)) == []
    assert set(opened) == set(json.loads((b / MANIFEST_NAME).read_text())["files"])  # every file
    opened.clear()
    assert verify_bundle(str(b), "tensorrt") == [] and set(opened) == TOKENIZER | {
        f"engines/{c}-now/{c}.plan" for c in ("text_encoder", "unet", "vae_decoder", "vae_encoder")}
    opened.clear()
    assert verify_bundle(str(b), "onnxruntime") == []
    assert set(opened) == TOKENIZER | EXPECTED[(Img2ImgPipeline, "onnxruntime", "cpu", True)]
    _corrupt(b / "engines/unet-now/unet.plan")
    _corrupt(b / "unet.onnx")  # the portable graph: onnxruntime reads it on CUDA, the CPU variant instead on the CPU
    assert verify_main([str(b), "--backend", "onnxruntime"]) == 0
    assert capsys.readouterr().out.strip() == f"{b}: ok"
    for argv, bad in (([], {"unet.plan", "unet.onnx"}), (["--backend", "tensorrt"], {"unet.plan"}),
                      (["--backend", "onnxruntime", "--device", "cuda"], {"unet.onnx"})):
        assert verify_main([str(b), *argv]) == 2
        lines = capsys.readouterr().out.splitlines()
        assert len(lines) == len(bad) and all(any(f"{name}: sha256 mismatch" in ln for ln in lines) for name in bad)
    assert verify_main([str(b), "--device", "cuda"]) == 2 and "--device needs --backend" in capsys.readouterr().err
    assert verify_main([str(b), "--backend", "tensorrt", "--device", "cpu"]) == 2


# -- permissions ----------------------------------------------------------------------------------------

def _modes(bundle: Path) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {"dir": {stat.S_IMODE(bundle.stat().st_mode)}, "file": set()}
    for p in bundle.rglob("*"):
        out["dir" if p.is_dir() else "file"].add(stat.S_IMODE(p.stat().st_mode))
    return out


def test_bundle_readable_by_others_under_umask_022(tiny_fp16_bundle):
    assert _modes(tiny_fp16_bundle) == {"dir": {0o755}, "file": {0o644}}


def test_bundle_modes_follow_the_umask(tiny_checkpoint_dir, tmp_path):
    old = os.umask(0o027)
    try:
        out = export_bundle(tiny_checkpoint_dir, tmp_path / "b", components="vae_decoder")
    finally:
        os.umask(old)
    assert (out / "vae_decoder.cpu.onnx").is_file()  # the variant and the manifest rewritten after it too
    assert _modes(out) == {"dir": {0o750}, "file": {0o640}}
