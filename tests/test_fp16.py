"""fp16 graph conversion (export/fp16.py) on small hand-made torch modules, run on onnxruntime CPU.

Each test states what fp16 gets wrong without a policy rule and that the rule fixes it, with the
measured figures printed.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto

from export.fp16 import Fp16Policy, convert_to_fp16, emulate_fp16, io_dtypes, policy_for
from export.graph_copy import infer_shapes
from export.parity import rel_l2

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _export(module: nn.Module, inputs: dict[str, torch.Tensor], outputs: list[str], path,
            dyn: dict | None = None) -> onnx.ModelProto:
    dyn = dyn or {k: {0: "B"} for k in [*inputs, *outputs]}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), tuple(inputs.values()), str(path), input_names=list(inputs),
                          output_names=outputs, dynamic_axes=dyn, opset_version=18, dynamo=False)
    return onnx.load(str(path))


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], emulate: bool = False) -> list[np.ndarray]:
    """Run on onnxruntime CPU; ``emulate`` runs the fp32 twin that rounds every fp16 tensor."""
    types = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    feeds = {k: v.astype(np.float16 if types[k] == TensorProto.FLOAT16 else np.float32) for k, v in feeds.items()}
    if emulate:
        model = emulate_fp16(model)
        feeds = {k: v.astype(np.float32) for k, v in feeds.items()}
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [o.astype(np.float32) for o in sess.run(None, feeds)]


class MiniBlock(nn.Module):
    """A U-Net-like block: timestep embedding, conv, GroupNorm, self-attention with LayerNorm, upsample."""

    def __init__(self, c: int = 16):
        super().__init__()
        self.c = c
        self.time_mlp = nn.Sequential(nn.Linear(c, 4 * c), nn.SiLU(), nn.Linear(4 * c, c))
        self.conv = nn.Conv2d(4, c, 3, padding=1)
        self.norm = nn.GroupNorm(4, c)
        self.ln = nn.LayerNorm(c)
        self.qkv = nn.Linear(c, 3 * c)
        self.out = nn.Conv2d(c, 4, 3, padding=1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        half = self.c // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        args = timestep[:, None].float() * freqs[None]  # (B, half)
        temb = self.time_mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))  # (B, C)
        h = F.silu(self.norm(self.conv(sample))) + temb[:, :, None, None]
        B, C, H, W = h.shape
        x = self.ln(h.flatten(2).transpose(1, 2))  # (B, C, H, W) -> (B, HW, C)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        x = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        h = h + x.transpose(1, 2).reshape(B, C, H, W)
        return self.out(F.interpolate(h, scale_factor=2.0, mode="nearest"))


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    torch.manual_seed(0)
    m = MiniBlock().eval()
    x = torch.randn(2, 4, 6, 5)
    t = torch.tensor([999.0, 17.5])
    path = tmp_path_factory.mktemp("fp16") / "mini.onnx"
    dyn = {"sample": {0: "B", 2: "h", 3: "w"}, "timestep": {0: "B"}, "out": {0: "B", 2: "H", 3: "W"}}
    return m, _export(m, {"sample": x, "timestep": t}, ["out"], path, dyn), path


def test_mini_block_types_and_parity(mini):
    module, fp32_model, path = mini
    model, report = convert_to_fp16(onnx.load(str(path)), policy_for("unet"))
    onnx.checker.check_model(model, full_check=True)
    infer_shapes(model, strict=True)
    # IO: timestep stays fp32 (policy), the rest is fp16
    assert io_dtypes(model) == {"sample": "float16", "timestep": "float32", "out": "float16"}
    # weights of fp16 nodes are fp16; the norms, softmax and the timestep branch stay fp32
    types = {t.name: t.data_type for t in model.graph.initializer}
    conv_w = [n.input[1] for n in model.graph.node if n.op_type == "Conv"]
    assert all(types[w] == TensorProto.FLOAT16 for w in conv_w), conv_w
    kept = report.fp32_op_types
    print("fp32 op types:", kept, "casts:", report.casts_added)
    for op in ("InstanceNormalization", "LayerNormalization", "Softmax", "Sin", "Cos"):
        assert kept.get(op, 0) >= 1, f"{op} should stay fp32, kept: {kept}"
    assert kept.get("MatMul", 0) >= 1  # the attention score MatMul
    assert kept.get("Conv", 0) == 0
    # Resize's scales input must stay float32 (onnxruntime rejects anything else)
    resize = next(n for n in model.graph.node if n.op_type == "Resize")
    inferred = {v.name: v.type.tensor_type.elem_type for v in infer_shapes(model).graph.value_info}
    inferred.update(types)
    assert inferred[resize.input[2]] == TensorProto.FLOAT

    rng = np.random.default_rng(1)
    for shape in ((2, 4, 6, 5), (3, 4, 9, 7)):
        x = rng.standard_normal(shape).astype(np.float32)
        t = np.linspace(999, 0, shape[0]).astype(np.float32)
        x16 = x.astype(np.float16).astype(np.float32)
        with torch.no_grad():
            ref = module(torch.from_numpy(x16), torch.from_numpy(t)).numpy()
        (got,) = _run(model, {"sample": x, "timestep": t})
        (emu,) = _run(model, {"sample": x, "timestep": t}, emulate=True)
        (got32,) = _run(fp32_model, {"sample": x16, "timestep": t})
        e16, e_emu, e32 = rel_l2(got, ref), rel_l2(emu, ref), rel_l2(got32, ref)
        print(f"shape {shape}: fp16 rel L2 {e16:.2e} (emulated {e_emu:.2e}), fp32 rel L2 {e32:.2e}")
        assert np.isfinite(got).all() and np.isfinite(emu).all()
        assert e16 <= 1e-2 and e_emu <= 1e-2 and e32 <= 1e-5


class Timestep(nn.Module):
    def forward(self, timestep: torch.Tensor) -> torch.Tensor:
        freqs = torch.exp(-math.log(10000.0) * torch.arange(32, dtype=torch.float32) / 32)
        args = timestep[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def test_timestep_embedding_needs_fp32(tmp_path):
    """sin/cos of arguments near 1000: an fp16 timestep is off by up to 0.25 rad."""
    t = np.array([999.0, 981.0, 500.5, 3.0], dtype=np.float32)
    ref = Timestep()(torch.from_numpy(t)).numpy()
    fp32 = _export(Timestep(), {"timestep": torch.from_numpy(t)}, ["emb"], tmp_path / "t.onnx")
    good, _ = convert_to_fp16(onnx.load(str(tmp_path / "t.onnx")), Fp16Policy(fp32_io=frozenset({"timestep"})))
    bad, _ = convert_to_fp16(fp32, Fp16Policy(keep_ops=frozenset(), attention_fp32=False, fp32_input_branches=False))
    e_good = float(np.abs(_run(good, {"timestep": t})[0] - ref).max())
    e_bad = float(np.abs(_run(bad, {"timestep": t})[0] - ref).max())
    print(f"timestep embedding max abs error: fp32 branch {e_good:.2e}, all fp16 {e_bad:.2e}")
    assert io_dtypes(good)["timestep"] == "float32" and io_dtypes(bad)["timestep"] == "float16"
    assert e_good <= 1e-3 < 5e-2 <= e_bad


class RMS(nn.Module):
    """A hand-written norm: the mean of squares of activations ~300 is ~9e4, past fp16's 65504."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def test_norm_reduction_overflows_without_fp32(tmp_path):
    x = (300 * np.random.default_rng(0).standard_normal((2, 8, 64))).astype(np.float32)
    ref = RMS()(torch.from_numpy(x)).numpy()
    _export(RMS(), {"x": torch.from_numpy(x)}, ["y"], tmp_path / "rms.onnx")
    good, rep = convert_to_fp16(onnx.load(str(tmp_path / "rms.onnx")))
    bad, _ = convert_to_fp16(onnx.load(str(tmp_path / "rms.onnx")), Fp16Policy(keep_ops=frozenset()))
    (g,), (b,) = _run(good, {"x": x}, emulate=True), _run(bad, {"x": x}, emulate=True)
    (b_cpu,) = _run(bad, {"x": x})
    print(f"RMS norm at scale 300: kept {rep.fp32_op_types}: rel L2 {rel_l2(g, ref):.2e}; all fp16 (emulated): "
          f"max |y| {np.abs(b).max():.2e} vs {np.abs(ref).max():.2e}; all fp16 on onnxruntime CPU: rel L2 "
          f"{rel_l2(b_cpu, ref):.2e} (its fp32 fallback kernels hide the overflow)")
    assert np.isfinite(g).all() and rel_l2(g, ref) <= 1e-2
    assert np.abs(b).max() < 1e-3 * np.abs(ref).max()  # the fp16 sum of squares is inf: y collapses to 0


class Scores(nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v


def test_attention_scores_overflow_without_fp32(tmp_path):
    """q.k of size ~1e5 (SD 2.x-like logits) is inf in fp16; the fp32 score path keeps it finite."""
    rng = np.random.default_rng(0)
    q = (80 * rng.standard_normal((2, 16, 64))).astype(np.float32)
    k = (80 * rng.standard_normal((2, 16, 64))).astype(np.float32)
    v = rng.standard_normal((2, 16, 64)).astype(np.float32)
    feeds = {"q": q, "k": k, "v": v}
    q16, k16, v16 = (torch.from_numpy(a.astype(np.float16).astype(np.float32)) for a in (q, k, v))
    ref = Scores()(q16, k16, v16).numpy()
    _export(Scores(), {n: torch.from_numpy(a) for n, a in feeds.items()}, ["y"], tmp_path / "att.onnx")
    good, _ = convert_to_fp16(onnx.load(str(tmp_path / "att.onnx")))
    bad, _ = convert_to_fp16(onnx.load(str(tmp_path / "att.onnx")), Fp16Policy(attention_fp32=False, keep_ops=frozenset()))
    (g,), (b,) = _run(good, feeds, emulate=True), _run(bad, feeds, emulate=True)
    print(f"attention logits max |q.k| {np.abs(q @ k.transpose(0, 2, 1)).max():.2e}: fp32 scores rel L2 "
          f"{rel_l2(g, ref):.2e}; fp16 scores {int((~np.isfinite(b)).sum())} non-finite of {b.size}")
    assert np.isfinite(g).all() and rel_l2(g, ref) <= 1e-2
    assert (~np.isfinite(b)).sum() > 0


class BigConst(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x * 1e-3, min=-1e5, max=1e5) + torch.tensor([1e5, 1.0])


def test_constants_beyond_fp16_are_clipped(tmp_path):
    x = np.array([[1.0, 2.0]], dtype=np.float32)
    _export(BigConst(), {"x": torch.from_numpy(x)}, ["y"], tmp_path / "c.onnx")
    model, rep = convert_to_fp16(onnx.load(str(tmp_path / "c.onnx")), Fp16Policy(keep_ops=frozenset()))
    (y,) = _run(model, {"x": x})
    (y_emu,) = _run(model, {"x": x}, emulate=True)
    print("clipped values:", rep.clipped_values, "y:", y, "emulated:", y_emu)
    assert np.array_equal(y, y_emu)
    assert rep.clipped_values >= 1
    assert np.isfinite(y).all() and y[0, 0] == np.float16(65504.0)
    assert abs(y[0, 1] - 1.002) < 1e-3
