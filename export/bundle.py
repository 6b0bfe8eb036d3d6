"""The bundle: ONNX graphs + their weights files + tokenizer + ``manifest.json``, built beside OUT and moved in whole.

Before anything is written, the source's tokenizer and scheduler config are read as the runtime
will read them (``check_source``). Everything is written into ``OUT.tmp-<pid>-XXXX`` next to OUT;
the manifest is written last (and atomically), then the folder is renamed into place. An
existing OUT is replaced only if it is a bundle (a manifest of our schema): it is renamed to
``OUT.old-<pid>-swap``, the new one renamed in, the old one deleted. A failed export (any
exception) removes its temporary folder; one killed outright leaves only a ``.tmp-<pid>-``
folder without a manifest, swept by the next export to that OUT.

The swap holds an exclusive lock on OUT's parent folder (``flock``), so exports racing to one
OUT replace it one after the other (the last one wins). The recovery rule for an export killed
mid-swap: the next export to OUT, under that lock and before anything else, moves an
``OUT.old-*-swap`` bundle back to OUT if OUT is missing (killed between the two renames), and
deletes it otherwise (killed while deleting it). ``recover_swap(OUT)`` applies the rule alone.
Files and folders are created as the umask says (not tempfile's private 0600/0700).
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import logging
import os
import re
import secrets
import shutil
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

from ldm_runtime.manifest import COMPONENTS, MANIFEST_NAME, SCHEMA, atomic_write_json, new_manifest, record_file
from ldm_runtime.tokenizer import TOKENIZER_OPTIONS

from .lora_map import add_lora_maps
from .onnx_export import OPSET, ExportResult, ParityError, export_component
from .specs import dims_from_models

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16")
_TMP_RE = re.compile(r"\.tmp-(\d+)-[^/]*$")


class ExportError(ValueError):
    """Bad input to an export: unknown components, an OUT that is not a bundle, a bad SRC."""


def parse_components(components: str | Iterable[str]) -> tuple[str, ...]:
    """Validate component names (comma-separated string or iterable); canonical order, no repeats."""
    names = [c.strip() for c in (components.split(",") if isinstance(components, str) else components)]
    names = [c for c in names if c]
    bad = [c for c in names if c not in COMPONENTS]
    if bad:
        raise ExportError(f"unknown component(s) {', '.join(map(repr, bad))}; valid components are {', '.join(COMPONENTS)}")
    if not names:
        raise ExportError(f"no components given; valid components are {', '.join(COMPONENTS)}")
    return tuple(c for c in COMPONENTS if c in names)


def is_bundle(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding a manifest of our schema (any schema version)."""
    m = Path(path) / MANIFEST_NAME
    try:
        data = json.loads(m.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("schema") == SCHEMA


def check_out(out: str | os.PathLike) -> Path:
    """Refuse an OUT that exists and is not a bundle (never overwrite unrelated files)."""
    out = Path(out)
    if out.exists() and not (out.is_dir() and is_bundle(out)):
        raise ExportError(f"{out}: exists and is not a bundle (no {MANIFEST_NAME} of schema {SCHEMA!r}); "
                          f"refusing to overwrite it")
    return out


def sweep_stale(out: Path) -> list[Path]:
    """Remove temporary folders of earlier exports to ``out`` whose process is gone."""
    removed: list[Path] = []
    if not out.parent.is_dir():
        return removed
    for p in out.parent.glob(f"{glob.escape(out.name)}.tmp-*"):
        m = _TMP_RE.search(p.name)
        if not (m and p.is_dir()) or _alive(int(m.group(1))):
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
        log.info("removed %s left by an export that did not finish", p)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    import ldm_runtime

    v = {"ldm_runtime": ldm_runtime.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
         "onnxruntime": onnxruntime.__version__, "python": sys.version.split()[0],
         "exporter": "torch.onnx.export (TorchScript, dynamo=False)"}
    try:
        import onnxscript

        v["onnxscript"] = onnxscript.__version__
    except ImportError:  # pragma: no cover - a dependency of the export extra
        pass
    return v


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def build_manifest(ld, src: Path, root: Path, precision: str, results: dict[str, ExportResult],
                   dims, tokenizers: dict[str, Sequence[str]]) -> dict[str, Any]:
    """The manifest of the bundle being built in ``root`` (files hashed from disk). ``tokenizers``: the
    bundle paths of each tokenizer's vocab and merges, by manifest field ("tokenizer", "tokenizer_2")."""
    man = new_manifest()
    vae = ld.vae_config
    man.update({
        "producer": {**man["producer"], **_versions()},
        "source": {"kind": ld.source_kind, "name": src.resolve().name},
        "precision": precision,
        "opset": max((r.opset for r in results.values()), default=OPSET),
        "latent": {"channels": dims.latent_channels, "scaling_factor": float(vae.scaling_factor),
                   "shift_factor": float(vae.shift_factor or 0.0), "vae_scale_factor": dims.vae_scale_factor},
        "default_size": {"height": int(ld.default_size[0]), "width": int(ld.default_size[1])},
        "text": {"max_length": dims.max_length, "hidden_size": dims.hidden_size},
        **{field: {"vocab": files[0], "merges": files[1],
                   **_tokenizer_options(tokenizer_sources(ld)[field][1], dims.max_length)}
           for field, files in tokenizers.items()},
        "scheduler": {"name": ld.scheduler_name, "config": dict(ld.scheduler_config)},
    })
    if ld.is_sdxl:
        man["conditioning"] = conditioning(ld)
    man["components"] = {c: {**r.manifest_entry(), **_precision_note(ld, c, precision)} for c, r in results.items()}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST_NAME:
            record_file(man, root, p.relative_to(root).as_posix())
    return man


_ENCODER_TOKENIZER = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}  # the manifest field of each's tokenizer


def tokenizer_sources(ld) -> dict[str, tuple[Path, dict]]:
    """The source's tokenizers by manifest field ("tokenizer", "tokenizer_2"): (folder, config), one per text encoder."""
    sources = {"text_encoder": (ld.tokenizer_dir, ld.tokenizer_config),
               "text_encoder_2": (ld.tokenizer_2_dir, ld.tokenizer_2_config)}
    return {_ENCODER_TOKENIZER[name]: (Path(sources[name][0]), sources[name][1]) for name in ld.text_encoders()}


def conditioning(ld) -> dict[str, Any]:
    """The manifest's ``conditioning`` of an SDXL source: its text encoders in concatenation order (the second
    one's pooled output feeds the U-Net's ``text_embeds``) and the pipeline's flags."""
    encoders = [{"component": name, "tokenizer": _ENCODER_TOKENIZER[name], "hidden": "hidden_states",
                 **({"pooled": "text_embeds"} if name == "text_encoder_2" else {})} for name in ld.text_encoders()]
    o = ld.sdxl
    return {"text_encoders": encoders, "force_zeros_for_empty_prompt": o.force_zeros_for_empty_prompt,
            "requires_aesthetics_score": o.requires_aesthetics_score, "pipeline": o.pipeline}


def component_precision(ld, component: str, precision: str) -> str:
    """The precision ``component`` is exported at: the bundle's, but fp32 for the VAE of an SDXL source with
    ``force_upcast`` (its VAE overflows in fp16 with real weights)."""
    upcast = ld.is_sdxl and ld.sdxl.vae_force_upcast and component in ("vae_decoder", "vae_encoder")
    return "fp32" if upcast else precision


def _precision_note(ld, component: str, precision: str) -> dict[str, str]:
    own = component_precision(ld, component, precision)
    return {} if own == precision else {"precision": own, "precision_reason": "force_upcast"}


def source_components(ld) -> tuple[str, ...]:
    """The components ``ld`` has, in ``COMPONENTS`` order (SD: no text_encoder_2; an SDXL refiner: no text_encoder)."""
    encoders = ld.text_encoders()
    return tuple(c for c in COMPONENTS if c in encoders or c not in _ENCODER_TOKENIZER)


def _tokenizer_options(config: dict, max_length: int) -> dict[str, Any]:
    """The source's tokenizer options that ``CLIPTokenizer`` takes (unset ones keep its defaults)."""
    opts = {k: config[k] for k in TOKENIZER_OPTIONS if config.get(k) is not None}
    opts["model_max_length"] = int(opts.get("model_max_length", max_length))
    return opts


def check_source(ld, max_length: int) -> None:
    """Refuse a source whose tokenizers or scheduler config ``ldm generate`` would refuse, before anything
    is written: both are read here as the runtime reads them."""
    from ldm_runtime.schedulers import make_scheduler
    from ldm_runtime.tokenizer import CLIPTokenizer

    for field, (folder, config) in tokenizer_sources(ld).items():
        try:
            tok = CLIPTokenizer(folder / "vocab.json", folder / "merges.txt", **_tokenizer_options(config, max_length))
        except (OSError, ValueError) as e:
            raise ExportError(f"the source's {field} in {str(folder)!r} cannot be read: {e}") from None
        if tok.model_max_length != max_length:
            raise ExportError(f"the source's {field} has model_max_length {tok.model_max_length}, but its text "
                              f"encoders take {max_length} tokens")
    try:
        make_scheduler(ld.scheduler_name, ld.scheduler_config).set_timesteps(1)
    except ValueError as e:
        raise ExportError(f"the source's scheduler config would be refused at generation time: {e}") from None


@contextlib.contextmanager
def _swap_lock(out: Path):
    """An exclusive ``flock`` on OUT's parent folder while OUT is swapped or recovered (released on close)."""
    fd = os.open(out.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _swap_leftovers(out: Path) -> list[Path]:
    pattern = re.compile(rf"{re.escape(out.name)}\.old-\d+-swap")
    return sorted(p for p in out.parent.iterdir() if pattern.fullmatch(p.name))


def _finish_swap(out: Path) -> Path | None:
    """The recovery rule (see the module docstring), under ``_swap_lock``: no swap is running, so an
    ``OUT.old-*-swap`` is a killed export's. Returns the folder restored to OUT, if any."""
    restored = None
    for old in _swap_leftovers(out):
        if not out.exists() and is_bundle(old):
            os.replace(old, out)
            restored = old
            log.warning("restored the bundle %s from %s, left by an export killed while replacing it", out, old.name)
        else:
            _discard(old)
    return restored


def recover_swap(out: str | os.PathLike) -> Path | None:
    """Apply the recovery rule to ``out`` now; the folder moved back to ``out``, or None."""
    out = Path(out).absolute()
    if not out.parent.is_dir():
        return None
    with _swap_lock(out):
        return _finish_swap(out)


def _discard(old: Path) -> None:
    """Delete a replaced bundle, its manifest first: a deletion cut short leaves no folder that looks whole."""
    (old / MANIFEST_NAME).unlink(missing_ok=True)
    shutil.rmtree(old, ignore_errors=True)


def _move_into_place(tmp: Path, out: Path) -> None:
    with _swap_lock(out):
        _finish_swap(out)
        if out.exists():
            check_out(out)  # still a bundle? (someone may have written there meanwhile)
            old = out.with_name(f"{out.name}.old-{os.getpid()}-swap")
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)  # put the old bundle back
                raise
            _discard(old)
        else:
            os.replace(tmp, out)
        _fsync_dir(out.parent)


def _fsync_dir(folder: Path) -> None:
    """Make the renames in ``folder`` durable."""
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass


def export_bundle(src: str | os.PathLike, out: str | os.PathLike, precision: str = "fp32",
                  components: str | Iterable[str] | None = None, *, opset: int = OPSET,
                  size: tuple[int, int] | None = None, models=None,
                  cpu_variants: bool = True) -> Path:
    """Export the models of ``src`` (a checkpoint or diffusers folder, SD or SDXL) to the bundle ``out``.

    precision: "fp32" or "fp16" (an SDXL VAE with ``force_upcast`` stays fp32, and its manifest entry
    says so). components: the subset to export (names or "a,b,c"; default: every one the source has).
    size: (height, width) in pixels at which models are traced and checked (default: the
    model's default size). models: an already loaded ``LatentDiffusion`` for ``src`` (tests).
    Each graph keeps its weights once, page-aligned in ``<component>.weights`` (``export/weights.py``).
    cpu_variants: for fp32 bundles, also write the onnxruntime-CPU variant of each graph whose
    attention can be fused (``com.microsoft.MultiHeadAttention``, see ``export/optimize.py``), gated
    against the portable graph; it reads the portable graph's weights file. TensorRT and onnxruntime
    on CUDA read the portable graphs; onnxruntime on the CPU reads the variants where there are any.
    Returns the bundle path. Raises ``ExportError`` for bad input, ``ParityError`` when a model
    fails its gate; in both cases nothing is left at ``out`` (an existing bundle stays as it was).
    """
    from training.checkpoint import check_text_conditioning, detect_kind, load_models

    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    wanted = None if components is None else parse_components(components)
    out = check_out(Path(out)).absolute()
    src = Path(src)
    if models is None:
        detect_kind(src)  # one clear CheckpointError for a folder of neither kind, before any work
        models = load_models(src)  # refuses text encoders that do not fit the U-Net
    else:
        check_text_conditioning(models, src)
    ld = models
    comps = _components_to_export(ld, wanted)
    dims = dims_from_models(ld)
    check_source(ld, dims.max_length)
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_swap(out)
    sweep_stale(out)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()  # 0777 less the umask, as the bundle folder will be (mkdtemp's is 0700)
    log.info("exporting %s (%s) to %s as %s, building in %s", src, ld.source_kind, out, precision, tmp.name)
    try:
        results = {c: export_component(c, ld, tmp, dims, component_precision(ld, c, precision), opset=opset, size=size)
                   for c in comps}
        tokenizers = _copy_tokenizers(ld, tmp)
        _fsync_tree(tmp)
        manifest = build_manifest(ld, src, tmp, precision, results, dims, tokenizers)
        if cpu_variants and precision == "fp32":
            from .optimize import OptimizeError, add_cpu_variants
            try:
                add_cpu_variants(tmp, manifest, tuple(comps))
            except OptimizeError as e:
                raise ParityError(f"CPU variant: {e}") from e
        add_lora_maps(tmp, manifest, {c: r.lora_targets for c, r in results.items() if r.lora_targets})
        atomic_write_json(tmp / MANIFEST_NAME, manifest)  # last: without it the folder is not a bundle
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("bundle written: %s (%d files)", out, len(manifest["files"]))
    return out


def _components_to_export(ld, wanted: tuple[str, ...] | None) -> tuple[str, ...]:
    """``wanted`` (default: every component the source has); one the source lacks is refused."""
    have = source_components(ld)
    missing = [c for c in wanted or () if c not in have]
    if missing:
        kind = "an SDXL refiner" if ld.is_sdxl else "an SD pipeline"
        raise ExportError(f"the source has no {', '.join(missing)} ({kind}); its components are {', '.join(have)}")
    return wanted or have


def _copy_tokenizers(ld, root: Path) -> dict[str, list[str]]:
    """Each tokenizer's vocab and merges copied to ``root/<field>/``; their bundle paths by manifest field."""
    copied = {}
    for field, (folder, _) in tokenizer_sources(ld).items():
        (root / field).mkdir()
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(folder / name, root / field / name)
        copied[field] = [f"{field}/vocab.json", f"{field}/merges.txt"]
    return copied
