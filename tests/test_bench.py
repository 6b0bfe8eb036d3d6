"""Benchmarks: ``ldm bench`` reports, the FLOP counter against closed forms and torch's counter,
and bench/device.sh's CPU fallback. Tiny models; the figures are not checked for speed, only for
being what they claim (call counts from the schedule, overhead = wall - inside engines, FLOPs)."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from export.optimize import optimize_bundle  # noqa: E402
from bench import flops, runtime  # noqa: E402
from bench.report import fmt_time  # noqa: E402
from ldm_runtime.manifest import BundleError, Manifest  # noqa: E402
from ldm_runtime.pipeline import Pipeline, files_in_use  # noqa: E402
from ldm_runtime.schedulers import make_scheduler  # noqa: E402
from ldm_runtime.timing import instrument  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle(tiny_fp32_bundle) -> Path:
    return tiny_fp32_bundle


# -- ldm bench -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_ldm_bench_writes_json_markdown_png(bundle, tmp_path):
    out = tmp_path / "report"
    rc = runtime.main([str(bundle), "--steps", "1,3", "--sizes", "48x80", "--repeats", "1", "--warmup", "1",
                     "--threads", "1", "--out", str(out)])
    assert rc == 0
    r = json.loads((out / "bench.json").read_text())
    assert set(r["components"]) == {"64x64", "48x80"}
    for rows in r["components"].values():
        assert set(rows) == {"text_encoder", "unet_2B", "unet_B", "vae_decoder"}
        assert rows["unet_2B"]["batch"] == 2 and rows["unet_B"]["batch"] == 1
        assert all(v["median_s"] > 0 for v in rows.values())
        # one timed call per repeat, the figure is its median
        assert all(len(v["runs_s"]) == 1 and v["median_s"] == statistics.median(v["runs_s"]) for v in rows.values())
    sched = make_scheduler(r["bundle_info"]["scheduler"], json.loads((bundle / "manifest.json").read_text())["scheduler"]["config"])
    for e in r["end_to_end"]:
        sched.set_timesteps(e["steps"])
        # one U-Net call per schedule entry, one text encoder call (the negative comes from the cache
        # after the warm-up), one decode
        assert e["engine_calls"] == {"text_encoder": 1, "unet": len(sched.timesteps), "vae_decoder": 1}, e["engine_calls"]
        d = abs(e["seconds"] - e["engine_seconds"] - e["overhead_seconds"])
        print(f"{e['height']}x{e['width']} {e['steps']} steps: {e['seconds']:.4f} s, overhead {e['overhead_pct']:.2f}%,"
              f" |wall - inside - overhead| {d:.1e}")
        assert d < 1e-9 and 0.0 < e["overhead_pct"] < 100.0
        # with one repeat every figure comes from the same run: the components' seconds add up to the
        # time inside the engines, which is part of the wall time; the percentages follow
        inside = e["engine_seconds_by_component"]
        assert set(inside) == {"text_encoder", "unet", "vae_decoder"}
        assert sum(inside.values()) == pytest.approx(e["engine_seconds"], rel=1e-12)
        assert e["engine_seconds"] < e["seconds"] == e["runs_s"][0]
        assert e["overhead_pct"] == pytest.approx(100.0 * e["overhead_seconds"] / e["seconds"], rel=1e-12)
        assert e["overhead_per_step_ms"] == pytest.approx(1e3 * e["overhead_seconds"] / e["steps"], rel=1e-12)
    assert [(e["steps"], e["height"], e["width"]) for e in r["end_to_end"]] == [(1, 64, 64), (3, 64, 64), (1, 48, 80)]
    st = r["startup"]
    for k in ("import_ldm_runtime_s", "import_pipeline_s", "load_s", "import_plus_load_s", "peak_rss_mb", "first_image_s"):
        assert st[k] > 0, k
    parts = st["import_ldm_runtime_s"] + st["import_pipeline_s"] + st["load_s"]
    assert abs(parts - st["import_plus_load_s"]) < 0.05 * st["import_plus_load_s"]
    assert st["rss_after_load_mb"] <= st["peak_rss_mb"] < 4096
    assert st["generate_steps"] == 1 and len(st["runs"]) == 1 and st["peak_rss_mb"] == st["runs"][0]["peak_rss_mb"]
    for run in st["runs"]:  # each child's total is the sum of its three parts, to float rounding
        parts = run["import_ldm_runtime_s"] + run["import_pipeline_s"] + run["load_s"]
        assert parts == pytest.approx(run["import_plus_load_s"], abs=1e-9)
    md = (out / "bench.md").read_text()
    assert "| size | text encoder | U-Net step, batch 2B |" in md and "| 48x80 | 1 |" in md
    for size, rows in r["components"].items():  # one table row per measured size, in the JSON's figures
        assert f"| {size} | {fmt_time(rows['text_encoder']['median_s'])} | {fmt_time(rows['unet_2B']['median_s'])} (B=1) |" in md
    for e in r["end_to_end"]:
        assert f"| {e['height']}x{e['width']} | {e['steps']} | {e['seconds']:.3f} | {e['engine_seconds']:.3f} |" in md
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "no plot" in md
    else:
        assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ldm_bench_bad_input(tmp_path, capsys):
    assert runtime.main([str(tmp_path), "--steps", "0"]) == 2
    assert "positive" in capsys.readouterr().err
    assert runtime.main([str(tmp_path / "nope"), "--no-startup"]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_session_options_reach_onnxruntime():
    """Each engine option the benchmarks compare lands in onnxruntime's SessionOptions as documented."""
    from ldm_runtime.backends.onnxruntime import OrtOptions, session_options

    so = session_options(OrtOptions(threads=2, opt_level="basic", arena=False, mem_pattern=False, spinning=False,
                                    spin_stop=True))
    assert so.intra_op_num_threads == 2 and so.inter_op_num_threads == 1
    assert not so.enable_cpu_mem_arena and not so.enable_mem_pattern
    assert str(so.graph_optimization_level).endswith("ORT_ENABLE_BASIC")
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert so.get_session_config_entry("session.force_spinning_stop") == "1"
    default = session_options()
    assert default.enable_cpu_mem_arena and str(default.graph_optimization_level).endswith("ORT_ENABLE_ALL")
    with pytest.raises(RuntimeError, match="does not have"):  # unset unless asked for
        default.get_session_config_entry("session.force_spinning_stop")
    with pytest.raises(ValueError, match="optimization level"):
        OrtOptions(opt_level="max")


def test_engine_clock_counts_only_time_inside_the_library():
    import time

    class Session:
        def run(self, names, feeds):
            time.sleep(0.02)
            return [feeds["x"]]

    class Eng:
        name, inputs, outputs = "unet", (), ()

        def __init__(self):
            self.session = Session()

        def run(self, feeds):
            time.sleep(0.03)  # our own code around the library call: must not be counted
            return dict(zip(["y"], self.session.run(["y"], feeds)))

    class Pipe:
        engines: dict = {}

        def engine(self, c):
            return self.engines.setdefault(c, Eng())

    pipe = Pipe()
    clock = instrument(pipe, ("unet",))
    pipe.engine("unet").run({"x": np.ones(2)})
    print(f"inside {clock.seconds['unet']:.4f} s (library sleeps 0.020 s, wrapper 0.030 s)")
    assert clock.calls == {"unet": 1}
    assert 0.019 <= clock.seconds["unet"] < 0.03


# -- the CPU variant (export/optimize.py) -----------------------------------------------------------

@pytest.fixture(scope="module")
def optimized(bundle, tmp_path_factory):
    import shutil

    b = shutil.copytree(bundle, tmp_path_factory.mktemp("opt") / "bundle")
    return b, optimize_bundle(b, ("unet", "vae_decoder"))


def test_cpu_variant_fuses_every_attention(optimized):
    b, info = optimized
    for comp in ("unet", "vae_decoder"):
        ops = [n.op_type for n in onnx.load(str(b / f"{comp}.onnx")).graph.node]
        fused = [n.op_type for n in onnx.load(str(b / f"{comp}.cpu.onnx")).graph.node]
        print(f"{comp}: {ops.count('Softmax')} softmax -> {fused.count('MultiHeadAttention')} MultiHeadAttention, "
              f"{len(ops)} -> {len(fused)} nodes, parity {info[comp]['parity']['value']:.1e}")
        assert ops.count("Softmax") == fused.count("MultiHeadAttention") == info[comp]["fused_attention"] > 0
        assert "Softmax" not in fused and len(fused) < len(ops)
        assert info[comp]["parity"]["value"] <= 1e-4
    man = Manifest.load(b)  # the variants are recorded with their hashes
    assert man.data["components"]["unet"]["cpu_variant"]["file"] == "unet.cpu.onnx"
    assert "unet.cpu.onnx" in files_in_use(man, Pipeline.required_components, "onnxruntime", "cpu")
    assert "unet.onnx" not in files_in_use(man, Pipeline.required_components, "onnxruntime", "cpu")
    assert "unet.onnx" in files_in_use(man, Pipeline.required_components, "onnxruntime", "cpu", cpu_variant=False)


def test_cpu_variant_shares_external_weights(bundle, tmp_path):
    from export.optimize import sample_shapes, write_cpu_variant

    src = tmp_path / "unet.onnx"  # the portable graph with its weights in unet.onnx.data
    onnx.save(onnx.load(str(bundle / "unet.onnx")), str(src), save_as_external_data=True, location="unet.onnx.data")
    shapes = sample_shapes(json.loads((bundle / "manifest.json").read_text()), "unet")
    info = write_cpu_variant(src, tmp_path / "unet.cpu.onnx", shapes)
    print(info)
    assert info["shares_weights"] and info["external_data"] == ["unet.onnx.data"] and info["fused_attention"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet.cpu.onnx", "unet.onnx", "unet.onnx.data"]
    assert (tmp_path / "unet.cpu.onnx").stat().st_size < 0.1 * (tmp_path / "unet.onnx.data").stat().st_size


def test_runtime_on_cpu_variant_matches_portable_graph(optimized, tmp_path):
    import shutil

    b, _ = optimized
    kw = dict(prompt="a red circle", num_inference_steps=3, guidance_scale=5.0, output_type="np",
              latents=np.random.default_rng(0).standard_normal((1, 4, 8, 8), dtype=np.float32))
    fast = Pipeline.load(b, threads=1)(**kw).images
    ref = Pipeline.load(b, threads=1, cpu_variant=False)(**kw).images
    d = float(np.abs(fast - ref).max())
    print(f"cpu variant vs portable graph: max abs diff {d:.2e}")
    assert d < 1e-4 and fast.std() > 1e-3
    broken = shutil.copytree(b, tmp_path / "b")
    with open(broken / "unet.cpu.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with pytest.raises(BundleError, match="sha256 mismatch"):
        Pipeline.load(broken)
    Pipeline.load(broken, cpu_variant=False)  # the variant is not read then


# -- FLOPs -----------------------------------------------------------------------------------------

def _model(nodes, inputs, outputs, inits=(), opsets=(("", 18),)):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])


def _vi(name, shape, t=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, t, shape)


def test_flops_conv_closed_form():
    # grouped, strided, padded conv with symbolic batch: 2 * N * Cout * Ho * Wo * (Cin / g) * kh * kw
    w = numpy_helper.from_array(np.zeros((6, 2, 3, 5), np.float32), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=2, strides=[2, 1], pads=[1, 2, 1, 2])
    m = _model([node], [_vi("x", ["N", 4, 9, 7])], [_vi("y", None)], [w])
    got = flops.count_flops(m, {"x": (3, 4, 9, 7)})
    ho, wo = (9 + 2 - 3) // 2 + 1, (7 + 4 - 5) // 1 + 1
    want = 2 * 3 * 6 * ho * wo * 2 * 3 * 5
    print(f"conv: counted {got['total']}, closed form {want}")
    assert got["total"] == want and got["by_op"] == {"Conv": want}


def test_flops_matmul_gemm_attention_closed_form():
    wmat = numpy_helper.from_array(np.zeros((6, 5), np.float32), "wm")
    wgemm = numpy_helper.from_array(np.zeros((7, 5), np.float32), "wg")
    nodes = [helper.make_node("MatMul", ["a", "wm"], ["p"]),  # (2, 4, 6) @ (6, 5): weights
             helper.make_node("MatMul", ["q", "k"], ["s"]),  # (2, 3, 4, 8) @ (1, 3, 8, 9): broadcast batch
             helper.make_node("Gemm", ["g", "wg"], ["gy"], transB=1),  # (4, 5) @ (7, 5)^T
             helper.make_node("MultiHeadAttention", ["mq", "mk", "mv"], ["mo"], domain="com.microsoft", num_heads=2)]
    m = _model(nodes, [_vi("a", [2, 4, 6]), _vi("q", [2, 3, 4, 8]), _vi("k", [1, 3, 8, 9]), _vi("g", [4, 5]),
                       _vi("mq", [2, 10, 16]), _vi("mk", [2, 7, 16]), _vi("mv", [2, 7, 12])],
               [_vi(o, None) for o in ("p", "s", "gy", "mo")], [wmat, wgemm],
               opsets=(("", 18), ("com.microsoft", 1)))
    shapes = {"a": (2, 4, 6), "q": (2, 3, 4, 8), "k": (1, 3, 8, 9), "g": (4, 5), "mq": (2, 10, 16),
              "mk": (2, 7, 16), "mv": (2, 7, 12)}
    got = flops.count_flops(m, shapes)["by_op"]
    want = {"MatMul (weights)": 2 * 2 * 4 * 6 * 5, "MatMul (attention)": 2 * 6 * 4 * 8 * 9, "Gemm": 2 * 4 * 5 * 7,
            "MultiHeadAttention": 2 * 2 * 10 * 7 * 16 + 2 * 2 * 10 * 7 * 12}
    print(f"counted {got}\nclosed form {want}")
    assert got == want


def test_flops_of_exported_unet_match_torch_counter(bundle, tiny_checkpoint_dir):
    # reference: torch's FlopCounterMode on the same U-Net (meta device, math attention)
    from bench.device_bench import unet_flops
    from training.checkpoint import load_models

    cfg = load_models(tiny_checkpoint_dir).unet_config
    for b, h, w in ((2, 5, 9),):  # odd latent sizes: the up path crops to the skip's size
        got = flops.count_flops(bundle / "unet.onnx", {"sample": (b, 4, h, w), "timestep": (b,),
                                                       "encoder_hidden_states": (b, 77, 32)})
        want = unet_flops(cfg, b, h, w)
        print(f"batch {b}, {h}x{w} latents: graph {got['total']} FLOPs, torch {want}; by op {got['by_op']}")
        assert got["total"] == want
        assert got["by_op"]["MatMul (attention)"] > 0


def test_limit_report_arithmetic(bundle):
    r = flops.limit_report(str(bundle), step_seconds=0.01, repeats=1, matmul_n=128, threads=1)
    total = flops.count_flops(bundle / "unet.onnx", flops.unet_input_shapes(
        json.loads((bundle / "manifest.json").read_text()), 64, 64, 2))["total"]
    print(f"{r['unet_gflops_per_step']:.4f} GFLOP/step, peaks {r['peak_gflops_s']}, fraction {r['fraction_of_peak']:.3f}")
    assert r["unet_gflops_per_step"] == pytest.approx(total / 1e9)
    assert set(r["peak_gflops_s"]) >= {"numpy", "onnxruntime", "torch"} and min(r["peak_gflops_s"].values()) > 0
    assert r["fraction_of_peak"] == pytest.approx(total / 0.01 / 1e9 / max(r["peak_gflops_s"].values()))


# -- device.sh -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_device_sh_cpu_fallback(tmp_path):
    out = tmp_path / "device.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PY": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "bench" / "device.sh"), "--cpu-smoke", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    rows = {row["backend"]: row for row in r["rows"]}
    print(proc.stdout)
    assert r["device"] == "cpu" and r["setup"].startswith("CPU smoke")
    ref = rows["torch eager float32, SDPA"]
    assert ref["unet_step_s"] > 0 and ref["e2e_s"] > 0 and "nonfinite 0" in ref["note"]
    assert rows["onnxruntime CUDA"]["note"].startswith("not available: ")
    assert rows["TensorRT"]["note"].startswith(("not available: ", "not measured: "))
    ort = rows["onnxruntime CPU"]
    assert ort["unet_step_s"] > 0
    # the graph of the exported U-Net and torch's counter agree on the FLOPs
    assert r["graph_flops_per_step"] == r["unet_flops_per_step"]
    assert ort["unet_tflops"] == pytest.approx(r["unet_flops_per_step"] / ort["unet_step_s"] / 1e12)
    assert "| onnxruntime CPU |" in proc.stdout and "| TensorRT | - |" in proc.stdout
    # first what decides the rest, then the GPU steps in the order (skipped here, saying why)
    lines = proc.stdout.splitlines()
    assert [ln.split(":")[0] for ln in lines[1:5]] == ["gpu", "cuda.bindings", "tensorrt", "onnxruntime"], lines[:5]
    steps = [ln for ln in lines if ln.startswith("== ")]
    assert steps == ["== probe", "== CUDA round-trip", "== TensorRT GPU test and a second build on its timing cache",
                     "== onnxruntime CUDA vs CPU", "== device_bench"]
    assert sum(ln.startswith("skipped: no CUDA GPU here (or --cpu-smoke)") for ln in lines) == 3


# -- bench/compare_diffusers.py (the peer side by side) -------------------------------------------

@pytest.mark.slow
def test_compare_diffusers_on_sdxl_is_the_same_picture(tiny_sdxl_dir, tiny_sdxl_bundle):
    """The SDXL folder is run through StableDiffusionXLPipeline (the class model_index.json names) on the
    same latents: the two images agree to the parity gate (2e-3), and the bundle's bytes are counted
    against the folder's parameters (the .weights files hold each fp32 weight once, page-aligned: within 1%;
    at this tiny size the tokenizers' vocabularies dominate the rest)."""
    from bench.compare_diffusers import compare

    r = compare(str(tiny_sdxl_bundle), str(tiny_sdxl_dir), steps=2, repeats=1, warmup=0, threads=1, startup=False)
    assert r["pipeline"] == "StableDiffusionXLPipeline"
    assert r["image_max_abs_diff"] <= 2e-3
    w = r["weights"]
    from safetensors.numpy import load_file

    n = sum(int(np.prod(t.shape)) for m in ("unet", "vae", "text_encoder", "text_encoder_2")
            for t in load_file(str(next((tiny_sdxl_dir / m).glob("*.safetensors")))).values())
    assert w["params"] == n
    assert w["bundle_bytes"] == sum(f.stat().st_size for f in tiny_sdxl_bundle.rglob("*") if f.is_file())
    weights = sum(f.stat().st_size for f in tiny_sdxl_bundle.glob("*.weights"))
    assert 1.0 <= weights / w["fp32_weight_bytes"] <= 1.01  # each weight once, page-aligned


def test_backend_ab_alternates_and_reports_each_component(bundle, capsys):
    """bench/backend_ab.py: calls go A B B A A B ... after one warm-up each, every component is timed on
    both backends (here onnxruntime twice, with and without its CPU variant: same graph maths)."""
    from bench import backend_ab

    calls = []

    class Fake:
        def __init__(self, name):
            self.name = name

        def run(self, feeds):
            calls.append(self.name)

    times = backend_ab.alternate([Fake("a"), Fake("b")], {}, rounds=3)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"] and [len(t) for t in times] == [3, 3]
    assert backend_ab.main([str(bundle), "--b", "onnxruntime", "--b-option", "cpu_variant=false",
                            "--threads", "1", "--rounds", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["components"]) == {"text_encoder", "unet_2B", "vae_decoder"}
    for row in report["components"].values():
        assert 0 < row["a_min_s"] <= row["a_median_s"] and 0 < row["b_min_s"] <= row["b_median_s"]
        assert row["b_over_a"] == pytest.approx(row["b_median_s"] / row["a_median_s"])
