"""torch -> ONNX for one component: export, graph clean-up, optional fp16, save, check, parity gate.

``export_component`` is the whole step for one model; ``export.bundle`` runs it per component
and writes the manifest from what it returns.
"""
from __future__ import annotations

import logging
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import torch
import torch.nn as nn

from ldm_runtime.manifest import TensorSpec

from . import parity
from .fp16 import Fp16Policy, convert_to_fp16, emulate_fp16, io_dtypes, policy_for
from .graph_copy import infer_shapes
from .parity import parity_metrics
from .specs import ComponentSpec, ModelDims, ProfileError, component_spec, sample_inputs, with_dtypes
from .lora_map import LORA_COMPONENTS, find_targets
from .weights import locations, save_with_weights

log = logging.getLogger(__name__)

OPSET = 18
EXTERNAL_DATA_THRESHOLD = 2_000_000_000  # protobuf cannot hold a model over 2 GiB; leave room for the graph


class ParityError(RuntimeError):
    """The exported model disagrees with the torch model beyond its named threshold."""


# ---------------------------------------------------------------------------------------------
# wrappers: fixed IO names and the exact call each component gets at run time

class _TextEncoder(nn.Module):
    def __init__(self, m: nn.Module):
        super().__init__()
        self.text_encoder = m

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids)  # (B, 77) -> (B, 77, D)


class _SDXLTextEncoder(nn.Module):
    """SDXL's use of a text encoder: the penultimate hidden state, and with ``pooled`` the projected pooled token."""

    def __init__(self, m: nn.Module, pooled: bool):
        super().__init__()
        self.text_encoder, self.pooled = m, pooled

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        out = self.text_encoder.encode(input_ids)
        hidden = out.hidden_states[-2]  # = sdxl_prompt_embeds(input_ids), from the same pass as the pooled output
        return (hidden, out.pooled) if self.pooled else hidden


class _UNet(nn.Module):
    """The U-Net called with its inputs in spec order: sample, timestep, encoder_hidden_states, then the
    optional ones the spec lists (``timestep_cond``: LCM; ``text_embeds``, ``time_ids``: SDXL)."""

    def __init__(self, m: nn.Module, optional: tuple[str, ...] = ()):
        super().__init__()
        self.unet, self.optional = m, optional

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                *optional: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states, **dict(zip(self.optional, optional)))


class _VaeDecoder(nn.Module):
    def __init__(self, vae: Any):
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent)  # unscaled latents: the runtime divides by scaling_factor


class _VaeEncoder(nn.Module):
    def __init__(self, vae: Any):
        super().__init__()
        self.vae = vae

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.vae.encode(image)  # (mean, logvar); the runtime samples with its own generator


def wrap(component: str, ld) -> nn.Module:
    """The module exported for ``component`` of a ``LatentDiffusion``: inputs and outputs in its spec's order."""
    optional = (("timestep_cond",) if ld.unet_config.time_cond_proj_dim is not None else ()) \
        + (("text_embeds", "time_ids") if ld.is_sdxl else ())

    def text(m: nn.Module | None, pooled: bool) -> nn.Module:
        if m is None:
            raise ValueError(f"these models have no {component!r} (an SDXL refiner has only text_encoder_2)")
        return _SDXLTextEncoder(m, pooled) if ld.is_sdxl else _TextEncoder(m)

    wrappers: dict[str, Callable[[], nn.Module]] = {
        "text_encoder": lambda: text(ld.text_encoder, pooled=False),
        "text_encoder_2": lambda: text(ld.text_encoder_2, pooled=True),
        "unet": lambda: _UNet(ld.unet, optional),
        "vae_decoder": lambda: _VaeDecoder(ld.vae),
        "vae_encoder": lambda: _VaeEncoder(ld.vae),
    }
    return wrappers[component]().eval()


# ---------------------------------------------------------------------------------------------
# the gate

def _worse(a: float, b: float, sense: str) -> float:
    return max(a, b) if sense == "max" else min(a, b)


Runner = Callable[[dict[str, np.ndarray]], list[np.ndarray]]


def ort_runner(model: str | Path, scratch: Path | None = None, emulate: bool = False) -> Runner:
    """Run the ONNX file ``model`` on onnxruntime's CPU provider, feeds cast to its input types.

    ``emulate``: run ``emulate_fp16(model)`` instead, the fp32 twin that rounds every fp16
    tensor (onnxruntime's CPU fallbacks compute most fp16 ops in fp32 and would hide overflow).
    Twins over 1 GB are written to ``scratch`` (protobuf cannot serialise more than 2 GB).
    """
    path = str(model)
    declared = {i.name: i.type.tensor_type.elem_type for i in onnx.load(path, load_external_data=False).graph.input}
    target: Any = path
    big = _file_bytes(Path(path)) > EXTERNAL_DATA_THRESHOLD // 2
    if emulate:
        twin = emulate_fp16(onnx.load(path))
        if _tensor_bytes(twin) < EXTERNAL_DATA_THRESHOLD // 2:
            target = twin.SerializeToString()
        else:
            if scratch is None:
                raise ValueError("an emulated twin over 1 GB needs a scratch folder to run from")
            scratch.mkdir(parents=True, exist_ok=True)
            target, big = str(scratch / "twin.onnx"), True
            onnx.save_model(twin, target, save_as_external_data=True, location="twin.onnx.data")
        del twin
    session = parity.cpu_session(target, low_memory=big)  # SD-scale models: memory over speed for a check
    del target
    names = [o.name for o in session.get_outputs()]
    np_types = {k: onnx.helper.tensor_dtype_to_np_dtype(v) for k, v in declared.items()}

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        # fp16 inputs are rounded to fp16 even when the emulated twin takes them as fp32
        feeds = {k: v.astype(np_types[k]) for k, v in feeds.items()}
        if emulate:
            feeds = {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in feeds.items()}
        return [np.asarray(o, dtype=np.float32) for o in session.run(names, feeds)]

    return run


def _file_bytes(path: Path) -> int:
    """The graph file's bytes and those of the external files it names."""
    light = onnx.load(str(path), load_external_data=False)
    return path.stat().st_size + sum((path.parent / loc).stat().st_size for loc in locations(light))


def check_parity(component: str, precision: str, module: nn.Module, cases: list[dict[str, np.ndarray]],
                 runners: dict[str, Callable[[], Runner]], feed_dtypes: dict[str, str]) -> dict[str, Any]:
    """Compare every runner with the torch model on every case; return the worst figures.

    ``runners`` maps a name to a factory; runners are opened one at a time (big models). The
    first runner's figures are the top-level ones; the others are nested under their names.
    Raises ``ParityError`` if any runner misses the component's gate or emits NaN/Inf.
    """
    metric, bound, sense = parity.gate_for(component, precision)
    # the torch reference sees exactly the values the ONNX model gets (rounded to fp16 if so)
    cases = [{k: v.astype(feed_dtypes[k]) for k, v in feeds.items()} for feeds in cases]
    refs = []
    with torch.no_grad():
        for feeds in cases:
            ref = module(*(torch.from_numpy(v.astype(np.float32) if v.dtype.kind == "f" else v) for v in feeds.values()))
            refs.append([r.numpy() for r in ([ref] if torch.is_tensor(ref) else ref)])
    worst: dict[str, dict[str, float]] = {}
    for rname, factory in runners.items():
        run, w = factory(), worst.setdefault(rname, {})
        for feeds, ref in zip(cases, refs):
            for r, g in zip(ref, run(feeds)):
                for k, v in parity_metrics(component, r, g).items():
                    w[k] = _worse(w[k], v, "min" if k == "psnr_db" else "max") if k in w else v
        del run
    first, *others = runners
    result: dict[str, Any] = {"precision": precision, "gate": {"metric": metric, "threshold": bound},
                              **worst[first], **{r: worst[r] for r in others},
                              "cases": [{k: list(v.shape) for k, v in feeds.items()} for feeds in cases]}
    failures = []
    for rname, w in worst.items():
        value = w[metric]
        if w["nonfinite"] or not parity.passes(value, bound, sense):
            failures.append(f"{rname}: {metric} = {value:.3g}" + (f", {w['nonfinite']} NaN/Inf" if w["nonfinite"] else ""))
        log.info("%s %s parity (%s): %s", component, precision, rname, {k: float(f"{v:.4g}") for k, v in w.items()})
    result["passed"] = not failures
    if failures:
        raise ParityError(f"{component} ({precision}) fails its parity gate ({metric} "
                          f"{'<=' if sense == 'max' else '>='} {bound:g}): {'; '.join(failures)}")
    return result


# ---------------------------------------------------------------------------------------------
# graph clean-up

def cleanup(model: onnx.ModelProto) -> onnx.ModelProto:
    """Constant folding, constants lifted to initializers, duplicate initializers and common
    subexpressions merged, dead nodes removed.

    onnxscript's full ``optimize`` also runs pattern rewrites, which take most of its time and
    remove almost no nodes from our graphs, so only the folding passes run.
    """
    import onnx_ir as ir
    from onnx_ir.passes import common as passes
    from onnxscript.optimizer import fold_constants_ir

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = ir.serde.deserialize_model(model)
        # node-level shape inference lets Shape->Gather of static dims fold; it serialises single
        # nodes only, so it is fine on big models
        fold_constants_ir(m, onnx_shape_inference=True)
        for p in (passes.RemoveUnusedNodesPass(),
                  passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
                  passes.DeduplicateInitializersPass(), passes.CommonSubexpressionEliminationPass(),
                  passes.RemoveUnusedNodesPass()):
            p(m)
        return ir.serde.serialize_model(m)


def _tensor_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for t in model.graph.initializer:
        total += len(t.raw_data) if t.raw_data else int(np.prod(t.dims, dtype=np.int64)) * 4
    return total


# ---------------------------------------------------------------------------------------------
# the export step

@dataclass
class ExportResult:
    """What the manifest records about one exported component."""

    component: str
    file: str
    external_data: list[str]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    opset: int
    nodes: dict[str, int]
    parity: dict[str, Any]
    batch_mult: int = 1
    fp16: dict[str, Any] | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    lora_targets: dict[str, Any] = field(default_factory=dict)  # export.lora_map.find_targets; written by the bundle

    def manifest_entry(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "file": self.file, "external_data": list(self.external_data),
            "inputs": [s.to_dict() for s in self.inputs], "outputs": [s.to_dict() for s in self.outputs],
            "opset": self.opset, "batch_mult": self.batch_mult, "nodes": dict(self.nodes), "parity": self.parity,
        }
        if self.fp16 is not None:
            d["fp16"] = self.fp16
        return d


def parity_cases(spec: ComponentSpec, dims: ModelDims, size: tuple[int, int]) -> list[dict[str, np.ndarray]]:
    """Two cases: batch 2 at ``size``, and batch 1 at a size one latent larger/smaller per side
    (so the gate also covers a size that is not the traced one)."""
    f = dims.vae_scale_factor
    h, w = size
    return [sample_inputs(spec, dims, 2, h, w, seed=1),
            sample_inputs(spec, dims, 1, h + f, max(f, w - f), seed=2)]


def export_component(component: str, ld, out_dir: str | Path, dims: ModelDims, precision: str = "fp32", *,
                     opset: int = OPSET, size: tuple[int, int] | None = None,
                     policy: Fp16Policy | None = None) -> ExportResult:
    """Export ``component`` of ``ld`` to ``out_dir/<component>.onnx``; gate it; describe it.

    ``size`` (pixels) is where the model is traced and checked (default: ``ld.default_size``).
    ``policy``: what stays fp32 in an fp16 export (default ``policy_for(component)``).
    Raises ``ParityError`` when the ONNX model disagrees with torch beyond its threshold.
    """
    if precision not in ("fp32", "fp16"):
        raise ValueError(f"precision must be 'fp32' or 'fp16', got {precision!r}")
    if opset < 18:
        raise ValueError(f"opset must be 18 or newer, got {opset}")
    out_dir = Path(out_dir)
    spec = component_spec(component, dims)
    size = (int((size or ld.default_size)[0]), int((size or ld.default_size)[1]))
    f = dims.vae_scale_factor
    if size[0] % f or size[1] % f or min(size) <= 0:
        raise ProfileError(f"{component}: size {size[0]}x{size[1]} px is not a positive multiple of the VAE factor {f}")
    module = wrap(component, ld)
    scratch = out_dir / f".{component}.scratch"  # big models come out of torch as many files
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        path, external, nodes, fp16_info, secs, lora_targets = export_onnx(
            component, module, spec, dims, precision, out_dir, scratch, size, opset, policy or policy_for(component))
        # parity gate against the torch model, on onnxruntime's CPU provider (and for fp16 also on
        # the twin that rounds every fp16 tensor: the CPU kernels compute most fp16 ops in fp32)
        t0 = time.perf_counter()
        graph = onnx.load(str(path), load_external_data=False)
        dtypes = io_dtypes(graph)
        opset_used = max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))
        runners: dict[str, Callable[[], Runner]] = {"onnxruntime_cpu": lambda: ort_runner(path)}
        if precision == "fp16":
            runners["emulated_fp16"] = lambda: ort_runner(path, scratch=scratch, emulate=True)
        parity = check_parity(component, precision, module, parity_cases(spec, dims, size), runners,
                              {s.name: dtypes[s.name] for s in spec.inputs})
        secs["parity"] = time.perf_counter() - t0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log.info("%s: exported %s (%s) in %s", component, path.name, precision, {k: round(v, 2) for k, v in secs.items()})
    return ExportResult(
        component=component, file=path.name, external_data=external,
        inputs=with_dtypes(spec.inputs, dtypes), outputs=with_dtypes(spec.outputs, dtypes),
        opset=opset_used, nodes=nodes, parity=parity, batch_mult=spec.batch_mult, fp16=fp16_info, seconds=secs,
        lora_targets=lora_targets)


def export_onnx(component: str, module: nn.Module, spec: ComponentSpec, dims: ModelDims, precision: str,
                out_dir: Path, scratch: Path, size: tuple[int, int], opset: int = OPSET,
                policy: Fp16Policy | None = None):
    """Trace, clean up, convert to fp16 (if asked), save and check: everything but the parity gate.

    Returns (path, external data files, node counts, fp16 report or None, seconds per step, LoRA targets:
    ``export.lora_map.find_targets``, empty for a component no LoRA targets).
    ``scratch`` is an empty folder for torch's raw export (big models come out as many files).
    """
    policy = policy or policy_for(component)
    secs: dict[str, float] = {}
    raw = scratch / f"{component}.onnx"
    trace = sample_inputs(spec, dims, 2, size[0], size[1], seed=0)
    t0 = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, tuple(torch.from_numpy(v) for v in trace.values()), str(raw),
                          input_names=spec.input_names, output_names=spec.output_names,
                          dynamic_axes=spec.dynamic_axes(), opset_version=opset, dynamo=False,
                          do_constant_folding=True)
    secs["export"] = time.perf_counter() - t0
    model = onnx.load(str(raw))
    for p in scratch.iterdir():
        p.unlink()
    nodes = {"before": len(model.graph.node)}

    t0 = time.perf_counter()
    model = cleanup(model)
    nodes["after"] = len(model.graph.node)
    secs["cleanup"] = time.perf_counter() - t0
    fp16_info = None
    if precision == "fp16":
        t0 = time.perf_counter()
        model, report = convert_to_fp16(model, policy)
        nodes["after_fp16"] = len(model.graph.node)
        fp16_info = {"policy": policy.to_dict(), **report.to_dict()}
        secs["fp16"] = time.perf_counter() - t0
    infer_shapes(model, strict=True)  # shape inference must pass on what we ship

    # the graph, its weights page-aligned in <component>.weights (see export/weights.py)
    path = out_dir / f"{component}.onnx"
    targets = find_targets(model, module, component) if component in LORA_COMPONENTS else {}
    external = save_with_weights(model, path, external=frozenset(t["initializer"] for t in targets.values()))
    del model
    onnx.checker.check_model(str(path))  # the path form reads external data and has no 2 GB limit
    return path, external, nodes, fp16_info, secs, targets
