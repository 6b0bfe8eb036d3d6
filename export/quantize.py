"""``ldm quantize BUNDLE``: an int8 bundle from an fp32 one, kept only if its images pass a quality gate.

The U-Net (and, when asked, the VAE decoder) is quantized with onnxruntime's static quantization:
QDQ format, the Conv and MatMul nodes with int8 weights (per output channel) and int8 activations
whose ranges are calibrated on the model's own inputs. Those inputs come from denoising runs of the
fp32 bundle itself (``Calibration``: a few prompts and seeds, every step's latents, timesteps and
text embeddings as the runtime feeds the U-Net; the decoder sees the final latents). What stays in
float (``Int8Policy``): every op but Conv and MatMul (normalizations, softmax, the fused attention,
the time embedding, which exports as Gemm), and the node scopes named in the policy.

The quantized graph is the one onnxruntime's CPU runs (the component's CPU variant where the fp32
bundle has one), so an int8 component has no CPU variant of its own. Every other component is copied
as it is. The new bundle is built in a temporary folder beside OUT, then judged by its quality gate
(``QualityGate``: the PSNR of its images against the fp32 bundle's, same prompt, seeds and steps);
it is moved into place only if it passes. The manifest keeps its source's top-level precision (fp32:
every component still takes and returns float32) and records ``"precision": "int8"`` on each quantized
component, the calibration and the gate's figures (``ldm_runtime/manifest.py``). The runtime runs int8
bundles on onnxruntime's CPU provider and refuses them on TensorRT.
"""
from __future__ import annotations

import logging
import math
import os
import re
import secrets
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ldm_runtime.manifest import MANIFEST_NAME, BundleError, Manifest, atomic_write_json, check_manifest, record_file

from .bundle import _move_into_place, check_out, recover_swap, sweep_stale

log = logging.getLogger(__name__)

QUANTIZABLE = ("unet", "vae_decoder")
# ``ldm quantize --calibration-method`` names -> onnxruntime's CalibrationMethod members
CALIBRATION_METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}
CALIBRATION_PROMPTS = ("a red circle on a blue background", "a green square in the middle",
                       "two yellow triangles on white", "a purple star above a grey line")


class QuantizeError(ValueError):
    """Bad input to ``ldm quantize``: not an fp32 bundle, already int8, an unknown component."""


class QualityGateError(RuntimeError):
    """The int8 bundle's images fell below the gate; nothing was written."""


@dataclass(frozen=True)
class Calibration:
    """The denoising runs whose U-Net (and decoder) inputs set the activation ranges."""

    prompts: tuple[str, ...] = CALIBRATION_PROMPTS
    seeds: tuple[int, ...] = (0,)
    steps: int = 20
    guidance_scale: float = 7.5

    def to_dict(self) -> dict:
        return {**asdict(self), "prompts": list(self.prompts), "seeds": list(self.seeds)}


@dataclass(frozen=True)
class QualityGate:
    """``image_psnr_db``: the PSNR in dB of the int8 bundle's images against the fp32 bundle's, all
    ``seeds`` pooled (one mean squared error over every pixel), must reach ``min_psnr_db``."""

    min_psnr_db: float = 30.0
    prompt: str = "a blue circle next to an orange square"
    seeds: tuple[int, ...] = tuple(range(1000, 1008))
    steps: int = 20
    guidance_scale: float = 7.5

    def to_dict(self) -> dict:
        return {"name": "image_psnr_db", **asdict(self), "seeds": list(self.seeds)}


@dataclass(frozen=True)
class Int8Policy:
    """What is quantized: ``op_types`` nodes outside the ``keep_scopes`` regexes (searched in node names,
    which the exporter writes as module paths); ``per_channel`` weight scales."""

    op_types: tuple[str, ...] = ("Conv", "MatMul")
    keep_scopes: tuple[str, ...] = ()
    per_channel: bool = True
    calibration_method: str = "minmax"
    percentile: float = 99.999

    def __post_init__(self):
        if self.calibration_method not in CALIBRATION_METHODS:
            raise QuantizeError(f"calibration method {self.calibration_method!r}: expected one of "
                                f"{', '.join(CALIBRATION_METHODS)}")
        if not 90.0 <= self.percentile <= 100.0:
            raise QuantizeError(f"percentile {self.percentile!r}: expected a value in [90, 100]")
        for s in self.keep_scopes:
            try:
                re.compile(s)
            except re.error as e:
                raise QuantizeError(f"keep scope {s!r}: not a regular expression ({e})") from None

    def to_dict(self) -> dict:
        return {"op_types": list(self.op_types), "keep_scopes": list(self.keep_scopes),
                "per_channel": self.per_channel, "format": "QDQ", "activations": "int8", "weights": "int8",
                "calibration_method": CALIBRATION_METHODS[self.calibration_method],
                **({"percentile": self.percentile} if self.calibration_method == "percentile" else {})}

    def calibrate_options(self) -> dict[str, Any]:
        """``quantize_static`` keyword arguments for the calibration method."""
        from onnxruntime.quantization import CalibrationMethod

        extra = {"CalibPercentile": self.percentile} if self.calibration_method == "percentile" else {}
        return {"calibrate_method": getattr(CalibrationMethod, CALIBRATION_METHODS[self.calibration_method]),
                "extra": extra}


class _RecordingEngine:
    """An engine that keeps a copy of every feed before running it (the calibration's inputs)."""

    def __init__(self, engine: Any, store: list[dict[str, np.ndarray]]):
        self.engine, self.store = engine, store
        self.inputs, self.outputs = engine.inputs, engine.outputs

    def run(self, feeds):
        self.store.append({k: np.array(v) for k, v in feeds.items()})
        return self.engine.run(feeds)


class _FeedReader:
    """onnxruntime's ``CalibrationDataReader`` protocol over captured feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._it: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def quantize_bundle(src: str | os.PathLike, out: str | os.PathLike | None = None, *,
                    components: tuple[str, ...] = ("unet",), calibration: Calibration = Calibration(),
                    gate: QualityGate = QualityGate(), policy: Int8Policy = Int8Policy(),
                    threads: int | None = None) -> Path:
    """Write the int8 twin of the fp32 bundle ``src`` to ``out`` (default: ``<src>-int8`` beside it).

    Returns ``out``. Raises ``QuantizeError`` or ``BundleError`` for bad input and
    ``QualityGateError`` when the images miss ``gate``; then nothing is left at ``out``.
    """
    from ldm_runtime.pipeline import Pipeline

    m = _source_manifest(src, components)
    out = check_out(Path(out) if out is not None else m.root.with_name(f"{m.root.name}-int8")).absolute()
    if out == m.root.absolute():
        raise QuantizeError(f"{out}: the int8 bundle must go to another folder than its fp32 source")
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_swap(out)
    sweep_stale(out)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        fp32 = Pipeline.load(m.root, threads=threads)
        captured = capture_feeds(fp32, components, calibration)
        manifest = _copy_unquantized(m, tmp, components)
        for c in components:
            manifest["components"][c] = quantize_component(m, c, tmp, captured[c], policy)
        manifest["quantization"] = {"source": {"name": m.root.name, "sha256": m.sha256},
                                    "components": list(components), "policy": policy.to_dict(),
                                    "calibration": {**calibration.to_dict(),
                                                    "samples": {c: len(captured[c]) for c in components}}}
        _record_files(manifest, tmp)
        int8 = Pipeline(Manifest(root=tmp, data=manifest), options=fp32.options)
        figures = judge(fp32, int8, gate)
        if not figures["passed"]:
            raise QualityGateError(f"the int8 bundle failed its quality gate, nothing written: image_psnr_db "
                                   f"{figures['psnr_db']:.2f} dB < min_psnr_db {gate.min_psnr_db:g} dB (int8 against "
                                   f"fp32, {len(gate.seeds)} seeds, {gate.steps} steps)")
        manifest["quantization"]["quality_gate"] = figures
        check_manifest(manifest, tmp / MANIFEST_NAME)
        atomic_write_json(tmp / MANIFEST_NAME, manifest)  # last: without it the folder is not a bundle
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("int8 bundle written: %s (image PSNR %.2f dB against fp32)", out, figures["psnr_db"])
    return out


def _source_manifest(src: str | os.PathLike, components: tuple[str, ...]) -> Manifest:
    """The verified manifest of ``src``, refused unless it is an fp32 bundle with each of ``components``."""
    bad = [c for c in components if c not in QUANTIZABLE]
    if bad or not components:
        raise QuantizeError(f"components {list(components)}: expected one or more of {', '.join(QUANTIZABLE)}")
    m = Manifest.load(src)
    if m.int8_components:
        raise QuantizeError(f"{src}: already an int8 bundle ({', '.join(m.int8_components)} quantized); "
                            "quantize its fp32 source instead")
    if m.precision != "fp32":
        raise QuantizeError(f"{src}: expected an fp32 bundle, got precision {m.precision!r}; export with --precision fp32")
    missing = [c for c in components if not m.has(c)]
    if missing:
        raise QuantizeError(f"{src}: the bundle has no {', '.join(missing)} to quantize (it has {sorted(m.data['components'])})")
    return m


def capture_feeds(pipe: Any, components: tuple[str, ...], calibration: Calibration) -> dict[str, list[dict]]:
    """Every feed ``components`` get while ``pipe`` (the fp32 pipeline) denoises the calibration prompts."""
    engines = {c: pipe.engine(c) for c in components}
    captured: dict[str, list[dict]] = {c: [] for c in components}
    try:
        for c in components:
            pipe.engines[c] = _RecordingEngine(engines[c], captured[c])
        for prompt in calibration.prompts:
            pipe(prompt, seed=list(calibration.seeds), num_images_per_prompt=len(calibration.seeds),
                 num_inference_steps=calibration.steps, guidance_scale=calibration.guidance_scale, output_type="np")
    finally:
        pipe.engines.update(engines)
    return captured


def _copy_unquantized(m: Manifest, tmp: Path, quantized: tuple[str, ...]) -> dict:
    """Copy every file of ``m`` except the quantized components' graphs and weights; the manifest to complete."""
    data = {k: v for k, v in m.data.items() if k not in ("files", "engines")}
    data.update(files={}, engines={}, components=dict(m.data["components"]))
    dropped = {f for c in quantized for f in _component_files(m.data["components"][c])}
    kept = {f for c, e in m.data["components"].items() if c not in quantized for f in _component_files(e)}
    for rel in m.data["files"]:
        if rel in dropped and rel not in kept:
            continue
        dest = tmp / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(m.path(rel, field=f"files[{rel!r}]"), dest)
    return data


def _component_files(entry: dict) -> list[str]:
    variant = entry.get("cpu_variant") or {}
    return [entry["file"], *(entry.get("external_data") or []), *([variant["file"]] if variant.get("file") else []),
            *(variant.get("external_data") or [])]


def quantize_component(m: Manifest, component: str, tmp: Path, feeds: list[dict[str, np.ndarray]],
                       policy: Int8Policy) -> dict:
    """Quantize the graph onnxruntime's CPU runs for ``component`` into ``tmp/<component>.onnx`` (+ weights);
    its manifest entry."""
    import onnx
    from onnxruntime.quantization import QuantFormat, quantize_static

    from .weights import save_with_weights

    entry = m.data["components"][component]
    variant = entry.get("cpu_variant") or {}
    with tempfile.TemporaryDirectory(dir=tmp) as scratch:
        graph = _private_copy(m, variant or entry, f"components.{component}{'.cpu_variant' if variant else ''}",
                              Path(scratch))
        model = onnx.load(str(graph))
        excluded = [n.name for n in model.graph.node if n.op_type in policy.op_types
                    and any(re.search(s, n.name) for s in policy.keep_scopes)]
        q_path = Path(scratch) / f"int8-{component}.onnx"
        calibrate = policy.calibrate_options()
        quantize_static(model, q_path, _FeedReader(feeds), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(policy.op_types), per_channel=policy.per_channel,
                        nodes_to_exclude=excluded, calibrate_method=calibrate["calibrate_method"],
                        extra_options={"ActivationSymmetric": False, **calibrate["extra"]})
        quantized = onnx.load(str(q_path))
        rel = f"{component}.onnx"
        external = save_with_weights(quantized, tmp / rel)
        figures = _component_parity(m, component, graph, tmp / rel, feeds[-1])
    counts = _node_counts(quantized, policy.op_types)
    kept = {k: v for k, v in entry.items() if k not in ("cpu_variant", "nodes", "parity")}
    return {**kept, "file": rel, "external_data": external, "precision": "int8",
            "quantization": {"from": "cpu_variant" if variant.get("file") else "portable",
                             "quantized_nodes": counts[0], "float_nodes": counts[1], "kept_in_float": excluded,
                             "parity": figures}}


def _private_copy(m: Manifest, entry: dict, where: str, folder: Path) -> Path:
    """Copy the graph of manifest ``entry`` and its external data into ``folder``; the graph's path there.

    onnx refuses to read external data through a file with several hard links (bundles built side by
    side may share them), and the copy keeps the source bundle out of reach of the quantizer's writes.
    """
    for rel, field in ((entry["file"], f"{where}.file"),
                       *((f, f"{where}.external_data[{i}]") for i, f in enumerate(entry.get("external_data") or []))):
        shutil.copyfile(m.path(rel, field=field), folder / Path(rel).name)
    return folder / Path(entry["file"]).name


def _node_counts(model, op_types: tuple[str, ...]) -> tuple[int, int]:
    """(``op_types`` nodes that read dequantized weights, those left in float)."""
    produced_by_dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    quantized = [n for n in model.graph.node if n.op_type in op_types and any(i in produced_by_dq for i in n.input[1:2])]
    total = sum(n.op_type in op_types for n in model.graph.node)
    return len(quantized), total - len(quantized)


def _component_parity(m: Manifest, component: str, fp32_graph: Path, int8_graph: Path,
                      feeds: dict[str, np.ndarray]) -> dict[str, float]:
    """The int8 graph's output against the fp32 graph's on one calibration feed (the last step's)."""
    from .parity import cpu_session, max_abs_rel, rel_l2

    name = m.component(component).outputs[0].name
    ref = cpu_session(fp32_graph).run([name], feeds)[0]
    got = cpu_session(int8_graph).run([name], feeds)[0]
    return {"rel_l2": rel_l2(got, ref), "max_abs_rel": max_abs_rel(got, ref)}


def _record_files(manifest: dict, root: Path) -> None:
    manifest["files"] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST_NAME:
            record_file(manifest, root, p.relative_to(root).as_posix())


def gate_images(pipe: Any, gate: QualityGate) -> np.ndarray:
    """(seeds, H, W, 3) float32 images in [0, 1] of ``pipe``: ``gate.prompt`` at each of ``gate.seeds``."""
    return pipe(gate.prompt, seed=list(gate.seeds), num_images_per_prompt=len(gate.seeds),
                num_inference_steps=gate.steps, guidance_scale=gate.guidance_scale, output_type="np").images


def image_psnr_db(got: np.ndarray, ref: np.ndarray) -> float:
    """PSNR in dB of images in [0, 1] (one mean squared error over all of them); 200 for identical ones."""
    mse = float(np.mean((np.asarray(got, np.float64) - np.asarray(ref, np.float64)) ** 2))
    return 10 * math.log10(1.0 / max(mse, 1e-20))


def judge(fp32: Any, int8: Any, gate: QualityGate) -> dict:
    """The gate's figures for the ``int8`` pipeline against the ``fp32`` one: pooled and per-seed PSNR, passed."""
    ref, got = gate_images(fp32, gate), gate_images(int8, gate)
    per_seed = [round(image_psnr_db(g, r), 3) for g, r in zip(got, ref)]
    psnr = image_psnr_db(got, ref)
    return {**gate.to_dict(), "psnr_db": round(psnr, 3), "min_seed_psnr_db": min(per_seed),
            "per_seed_psnr_db": per_seed, "passed": psnr >= gate.min_psnr_db}


def quantize_main(argv: list[str] | None = None) -> int:
    """``ldm quantize BUNDLE [--out DIR] [...]``; exit 0 ok, 1 failed gate or internal error, 2 bad input."""
    import sys

    from ldm_runtime.cliargs import ArgumentParser, UsageError, one_line

    p = ArgumentParser(prog="ldm quantize", description="Write the int8 twin of an fp32 bundle, "
                       "kept only if its images pass the quality gate against the fp32 bundle.")
    p.add_argument("bundle", help="an fp32 bundle folder")
    p.add_argument("--out", default=None, help="the int8 bundle folder (default: BUNDLE-int8 beside it)")
    p.add_argument("--components", default="unet", help=f"comma-separated subset of {','.join(QUANTIZABLE)} "
                   "(default: unet)")
    p.add_argument("--min-psnr", type=float, default=QualityGate.min_psnr_db,
                   help="the gate: least image PSNR in dB against the fp32 bundle (default %(default)s)")
    p.add_argument("--gate-steps", type=int, default=QualityGate.steps, help="denoising steps of the gate's images")
    p.add_argument("--calibration-steps", type=int, default=Calibration.steps,
                   help="denoising steps of each calibration run")
    p.add_argument("--calibration-method", default=Int8Policy.calibration_method, choices=list(CALIBRATION_METHODS),
                   help="how activation ranges are set from the calibration feeds (default %(default)s)")
    p.add_argument("--percentile", type=float, default=Int8Policy.percentile,
                   help="with --calibration-method percentile: the kept percentile of |activation| (default %(default)s)")
    p.add_argument("--keep", default="", help="comma-separated regexes of node names (module paths) whose Conv and "
                   "MatMul nodes stay in float, e.g. 'conv_in,conv_out'")
    p.add_argument("--per-tensor", action="store_true", help="one weight scale per tensor instead of per channel")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    try:
        args = p.parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as e:
        print(f"ldm quantize: error: {e} (see ldm quantize --help)", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)
    try:
        policy = Int8Policy(keep_scopes=tuple(k.strip() for k in args.keep.split(",") if k.strip()),
                            per_channel=not args.per_tensor, calibration_method=args.calibration_method,
                            percentile=args.percentile)
        out = quantize_bundle(args.bundle, args.out, components=tuple(c.strip() for c in args.components.split(",")),
                              calibration=Calibration(steps=args.calibration_steps),
                              gate=QualityGate(min_psnr_db=args.min_psnr, steps=args.gate_steps), policy=policy,
                              threads=args.threads)
    except QualityGateError as e:
        print(f"ldm quantize: {one_line(e)}", file=sys.stderr)
        return 1
    except (QuantizeError, BundleError, OSError, ValueError) as e:
        print(f"ldm quantize: error: {one_line(e)}", file=sys.stderr)
        return 2
    print(out)
    return 0
