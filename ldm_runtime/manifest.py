"""The bundle manifest: the one file the runtime reads to learn what it runs.

A bundle is a folder with ``manifest.json`` at its root and the files it names. The manifest is
written last (and atomically) by ``export``; a folder without one is not a bundle. The schema is
versioned: the runtime refuses versions it does not know. Each version's JSON Schema ships in the
package as ``ldm_runtime/schema/manifest-v<N>.json`` (draft-07, for readers in any language);
``Manifest.load`` validates against it, then checks what a schema cannot (``check_manifest``).

Schema (version 1)::

    {
      "schema": "ldm-runtime-bundle",
      "schema_version": 1,
      "created": "2026-11-27T21:00:00Z",
      "producer": {"ldm_runtime": "0.1.0", "torch": "2.13.0", "onnx": "1.19.0", ...},
      "source": {"kind": "checkpoint" | "diffusers", "name": "..."},
      "precision": "fp32" | "fp16",
      "opset": 18,
      "files": {"unet.onnx": {"sha256": "...", "bytes": 123}, ...},
      "components": {
        "unet": {
          "file": "unet.onnx",
          "external_data": [],                       # extra files holding weights, if any
          "inputs":  [{"name": "sample", "dtype": "float32", "shape": ["B", 4, "h", "w"]}, ...],
          "outputs": [{"name": "out_sample", "dtype": "float32", "shape": ["B", 4, "h", "w"]}],
          "batch_mult": 2,                           # most rows per image per call (optional; see ComponentInfo)
          "nodes": {"before": 1234, "after": 987},   # graph clean-up
          "parity": {"metric": value, ...}           # measured at export against torch
        },
        "text_encoder": {...}, "vae_decoder": {...}, "vae_encoder": {...}
      },
      "latent": {"channels": 4, "scaling_factor": <float, the VAE's>, "vae_scale_factor": 8},
      "default_size": {"height": 512, "width": 512},
      "text": {"max_length": 77, "hidden_size": 768},
      "tokenizer": {"vocab": "tokenizer/vocab.json", "merges": "tokenizer/merges.txt",
                    "model_max_length": 77, "pad_token": "<|endoftext|>", ...},  # tokenizer.TOKENIZER_OPTIONS
      "scheduler": {"name": "pndm", "config": {...diffusers scheduler config keys...}},
      "engines": {"<key>": {"component": "unet", "file": "...", "onnx_sha256": "...", ...}}
    }

SDXL bundles (every field below optional; absent ``conditioning``: SD, one ``text_encoder`` whose
``last_hidden_state`` is the U-Net's context) add::

      "components": {"text_encoder_2": {...}, ...},   # text_encoder: outputs hidden_states (B, L, D1);
                                                      # text_encoder_2: hidden_states (B, L, D2), text_embeds (B, P);
                                                      # unet: inputs text_embeds (B, P), time_ids (B, 6 | 5)
      "tokenizer_2": {...as "tokenizer"...},           # text_encoder_2's (SDXL's pads with "!")
      "conditioning": {
        "text_encoders": [{"component": "text_encoder", "tokenizer": "tokenizer", "hidden": "hidden_states"},
                          {"component": "text_encoder_2", "tokenizer": "tokenizer_2", "hidden": "hidden_states",
                           "pooled": "text_embeds"}],   # hidden outputs concatenated in this order: the U-Net's
                                                        # encoder_hidden_states; the pooled one: its text_embeds
        "force_zeros_for_empty_prompt": true,   # negative_prompt=None: all-zero negative embeddings
        "requires_aesthetics_score": false,     # time_ids of 5 (original size, crop, aesthetic score), not 6
        "pipeline": "StableDiffusionXLPipeline" # or "StableDiffusionXLImg2ImgPipeline" (a refiner: img2img only)
      }

A refiner lists only ``text_encoder_2`` and may have no ``text_encoder`` or ``tokenizer``;
``text.hidden_size`` is the U-Net's context width (the hidden widths summed). A component exported in
fp32 inside an fp16 bundle (the VAE of a source with ``force_upcast``) says so in its entry:
``"precision": "fp32", "precision_reason": "force_upcast"``.

An int8 bundle (``ldm quantize``, ``export/quantize.py``) keeps the float ``precision`` of its source;
each quantized component says ``"precision": "int8"`` (float32 inputs and outputs, a QDQ graph, no
``cpu_variant``) with its ``quantization`` figures, and a top-level ``quantization`` records the fp32
source, the calibration runs and the quality gate it passed::

      "quantization": {"source": {"name": "...", "sha256": "..."}, "components": ["unet"], "policy": {...},
                       "calibration": {"prompts": [...], "seeds": [0], "steps": 20, "samples": {"unet": 80}},
                       "quality_gate": {"name": "image_psnr_db", "min_psnr_db": 30.0, "psnr_db": 41.2,
                                        "passed": true, ...}}

Symbolic dimensions are strings; fixed ones are ints. Older bundles may carry a component
``profile`` (shape ranges that nothing read; engine builds compute their own): it is ignored.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import re
import secrets
import stat
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

SCHEMA = "ldm-runtime-bundle"
SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
COMPONENTS = ("text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder")  # text_encoder_2: SDXL


class BundleError(ValueError):
    """A bundle is missing, malformed, or does not match its manifest."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def contained_path(root: str | os.PathLike, rel: Any, field: str) -> Path:
    """``root / rel``, refused with a ``BundleError`` naming ``field`` unless it stays inside ``root``."""
    why = _path_problem(rel)
    if why is None:
        base = Path(root).resolve()
        resolved = (base / rel).resolve()
        if resolved.is_relative_to(base):
            return resolved
        why = "it leads out of the bundle through a symlink"
    raise BundleError(f"{root}: manifest field {field} = {_shown(rel)}: expected a relative path inside the "
                      f"bundle; {why}")


def _path_problem(rel: Any) -> str | None:
    if not isinstance(rel, str):
        return f"got {_kind(rel)}"
    if not rel:
        return "it is empty"
    if "\0" in rel:
        return "it contains a NUL byte"
    if os.path.isabs(rel):
        return "it is absolute"
    if ".." in Path(rel).parts:
        return "it contains '..'"
    return None


def _shown(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 120 else text[:117] + "..."


def _kind(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_size(p: Path, rec: dict, size: int) -> None:
    if size != rec["bytes"]:
        raise BundleError(f"{p}: size mismatch: manifest says {rec['bytes']} bytes, file has {size}")


def _check_digest(p: Path, rec: dict, digest: str) -> None:
    if digest != rec["sha256"]:
        raise BundleError(f"{p}: sha256 mismatch: the file differs from the manifest's files entry")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename over ``path``.

    The temporary name is unique (concurrent writers of one ``path`` never share it; the last
    rename wins) and the file is created 0666 less the umask, as ``open()`` would (mkstemp's is 0600).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and (possibly symbolic) shape of one model input or output."""

    name: str
    dtype: str  # numpy dtype name: "float32", "float16", "int64", "int32"
    shape: tuple[int | str, ...]

    @classmethod
    def from_dict(cls, d: dict) -> "TensorSpec":
        return cls(name=d["name"], dtype=d["dtype"], shape=tuple(d["shape"]))

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class ComponentInfo:
    name: str
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    extra: dict = field(default_factory=dict, compare=False)

    @classmethod
    def from_dict(cls, name: str, d: dict) -> "ComponentInfo":
        try:
            return cls(
                name=name,
                file=d["file"],
                inputs=tuple(TensorSpec.from_dict(x) for x in d["inputs"]),
                outputs=tuple(TensorSpec.from_dict(x) for x in d["outputs"]),
                extra={k: v for k, v in d.items() if k not in ("file", "inputs", "outputs")},
            )
        except (KeyError, TypeError) as e:
            raise BundleError(f"manifest component {name!r} is malformed: missing or bad key {e}") from None

    @property
    def batch_mult(self) -> int:
        """The most rows per image the runtime feeds this component: 2 for a U-Net called on
        [uncond, cond] batches, else 1. Bundles written without ``batch_mult`` imply 2 for a U-Net
        without a guidance-embedding input (``timestep_cond``) and 1 for everything else."""
        if "batch_mult" in self.extra:
            return int(self.extra["batch_mult"])
        return 2 if self.name == "unet" and all(s.name != "timestep_cond" for s in self.inputs) else 1


@dataclass
class Manifest:
    """A parsed ``manifest.json``. ``root`` is the bundle folder."""

    root: Path
    data: dict

    # -- loading -------------------------------------------------------------------------
    @classmethod
    def load(cls, bundle: str | os.PathLike, verify: bool = True) -> "Manifest":
        root = Path(bundle)
        path = root / MANIFEST_NAME
        if not root.is_dir():
            raise BundleError(f"bundle {str(root)!r} is not a folder")
        if not path.is_file():
            raise BundleError(f"{str(root)!r} is not a bundle: it has no {MANIFEST_NAME}")
        contained_path(root, MANIFEST_NAME, field="(the manifest file itself)")  # not a symlink out
        data = read_manifest(path)
        check_manifest(data, path)
        m = cls(root=root, data=data)
        if verify:
            m.verify_files()
        return m

    def verify_files(self, names: list[str] | None = None) -> None:
        """Check that every listed file (or each of ``names``) lies inside the bundle with its recorded
        size and sha256. A name ``files`` does not list fails: nothing unrecorded is trusted."""
        for rel in names if names is not None else list(self.data["files"]):
            with self._open_listed(rel, f"files[{rel!r}]") as (f, rec, p):
                h = hashlib.sha256()
                while block := f.read(1 << 20):
                    h.update(block)
                _check_digest(p, rec, h.hexdigest())

    def read_verified(self, rel: str, field: str) -> bytes:
        """The bytes of bundle file ``rel`` (named by manifest ``field``), checked against ``files``.

        The check runs on the bytes returned, so what the caller uses is what was verified, even if
        the file on disk changes afterwards.
        """
        with self._open_listed(rel, field) as (f, rec, p):
            data = f.read(rec["bytes"] + 1)
        _check_size(p, rec, len(data))
        _check_digest(p, rec, hashlib.sha256(data).hexdigest())
        return data

    def file_record(self, rel: str) -> dict:
        """``files[rel]``: its ``sha256`` and ``bytes``; a file without both is refused."""
        files = self.data["files"]
        rec = files.get(rel) if isinstance(files, dict) else None
        if rec is None:
            raise BundleError(f"{self.root}: file {rel!r} is not listed in the manifest's files "
                              "(every file the runtime reads needs its sha256 and bytes there)")
        if not (isinstance(rec, dict) and isinstance(rec.get("sha256"), str) and _is_count(rec.get("bytes"))):
            raise BundleError(f"{self.root}: manifest field files[{rel!r}]: expected {{\"sha256\": hex string, "
                              f"\"bytes\": int >= 0}}, got {_shown(rec)}")
        return rec

    @contextlib.contextmanager
    def _open_listed(self, rel: str, field: str):
        """(file, its ``files`` record, path) of a listed regular file inside the bundle whose size matches;
        opened without blocking (a FIFO is refused, not waited on) and without following a symlink put in
        place of the checked path since."""
        p = self.path(rel, field=field)
        rec = self.file_record(rel)
        try:
            fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            raise BundleError(f"{self.root}: missing file {rel!r} named in the manifest ({field})") from None
        except OSError as e:
            raise BundleError(f"{self.root}: cannot open {rel!r} ({field}): {e.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise BundleError(f"{self.root}: {rel!r} ({field}) is not a regular file")
            _check_size(p, rec, st.st_size)
            yield f, rec, p

    # -- accessors -------------------------------------------------------------------------
    def path(self, rel: str, field: str = "path") -> Path:
        """Bundle file ``rel`` as named by the manifest's ``field`` (a JSON path, for the error).

        The one containment check every opener goes through: ``rel`` must be a non-empty relative
        path without ``..`` or NUL whose resolved location (symlinks followed) stays in the bundle.
        """
        return contained_path(self.root, rel, field)

    @property
    def precision(self) -> str:
        return self.data.get("precision", "fp32")

    @property
    def int8_components(self) -> tuple[str, ...]:
        """The components ``ldm quantize`` made int8 (``"precision": "int8"``; onnxruntime's CPU only)."""
        return tuple(c for c, e in self.data["components"].items() if e.get("precision") == "int8")

    def has(self, component: str) -> bool:
        return component in self.data["components"]

    def component(self, name: str) -> ComponentInfo:
        comps = self.data["components"]
        if name not in comps:
            raise BundleError(f"{self.root}: bundle has no {name!r} component (it has {sorted(comps)})")
        return ComponentInfo.from_dict(name, comps[name])

    @property
    def latent_channels(self) -> int:
        return int(self.data["latent"]["channels"])

    @property
    def scaling_factor(self) -> float:
        return float(self.data["latent"]["scaling_factor"])

    @property
    def shift_factor(self) -> float:
        return float(self.data["latent"].get("shift_factor") or 0.0)

    @property
    def vae_scale_factor(self) -> int:
        return int(self.data["latent"]["vae_scale_factor"])

    @property
    def default_size(self) -> tuple[int, int]:
        d = self.data["default_size"]
        return int(d["height"]), int(d["width"])

    @property
    def text_max_length(self) -> int:
        return int(self.data["text"]["max_length"])

    @property
    def text_hidden_size(self) -> int:
        return int(self.data["text"]["hidden_size"])

    @property
    def scheduler_name(self) -> str:
        return self.data["scheduler"]["name"]

    @property
    def scheduler_config(self) -> dict:
        return dict(self.data["scheduler"]["config"])

    @property
    def tokenizer(self) -> dict:
        return dict(self.data["tokenizer"])

    @property
    def conditioning(self) -> dict | None:
        """The SDXL ``conditioning`` entry (text encoders, pooled output, flags); None for an SD bundle."""
        cond = self.data.get("conditioning")
        return None if cond is None else dict(cond)

    @property
    def sha256(self) -> str:
        """A short identity for the bundle: sha256 of the manifest's file table."""
        blob = json.dumps(self.data["files"], sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


def new_manifest() -> dict:
    """An empty manifest skeleton with the schema keys filled in (export completes it)."""
    import datetime as _dt

    from . import __version__

    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "producer": {"ldm_runtime": __version__},
        "files": {},
        "components": {},
        "engines": {},
    }


def record_file(manifest: dict, root: str | os.PathLike, rel: str) -> dict:
    """Hash ``root/rel`` and record it in ``manifest['files']``; returns the record."""
    p = Path(root) / rel
    rec = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    manifest["files"][rel] = rec
    return rec


# -- reading and checking a manifest -----------------------------------------------------------
# The structure is the JSON Schema ldm_runtime/schema/manifest-v<schema_version>.json (for other
# languages too); what a schema cannot say (finite numbers, float32 range, shapes that agree with
# ``latent`` and ``text``, a scheduler config the runtime can honour) is checked here after it.

MAX_MANIFEST_BYTES = 16 << 20  # a manifest is kilobytes: refuse a huge file before parsing it
MAX_DEPTH = 32  # JSON nesting; the schema's deepest path is 6 levels
# manifest fields that the declared tensor shapes repeat: (field, component, "inputs" | "outputs", tensor, axis)
AGREEING_DIMS = (
    ("latent.channels", "unet", "inputs", "sample", 1),
    ("latent.channels", "unet", "outputs", "out_sample", 1),
    ("latent.channels", "vae_decoder", "inputs", "latent", 1),
    ("latent.channels", "vae_encoder", "outputs", "mean", 1),
    ("latent.channels", "vae_encoder", "outputs", "logvar", 1),
    ("text.max_length", "text_encoder", "inputs", "input_ids", 1),
    ("text.max_length", "text_encoder_2", "inputs", "input_ids", 1),
    ("text.max_length", "unet", "inputs", "encoder_hidden_states", 1),
    ("text.hidden_size", "text_encoder", "outputs", "last_hidden_state", 2),
    ("text.hidden_size", "unet", "inputs", "encoder_hidden_states", 2),
)
_SURROGATE = re.compile("[\\ud800-\\udfff]")
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_./-]{1,200}")


def schema_file(version: int = SCHEMA_VERSION):
    """The JSON Schema of manifest ``version``, shipped in the package (``importlib.resources``)."""
    return resources.files("ldm_runtime") / "schema" / f"manifest-v{version}.json"


@functools.lru_cache(maxsize=None)
def _validator(version: int):
    import fastjsonschema

    return fastjsonschema.compile(json.loads(schema_file(version).read_text(encoding="utf-8")))


def read_manifest(path: Path) -> dict:
    """``path`` parsed: a UTF-8 JSON object of our schema and a version this runtime reads, or a ``BundleError``."""
    with open(path, "rb") as f:
        raw = f.read(MAX_MANIFEST_BYTES + 1)
    if len(raw) > MAX_MANIFEST_BYTES:
        raise BundleError(f"{path}: larger than {MAX_MANIFEST_BYTES >> 20} MiB; a manifest is a few kilobytes")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise BundleError(f"{path}: not UTF-8 (byte {e.start}: {e.reason}); a manifest is UTF-8 JSON") from None
    except RecursionError:
        raise BundleError(f"{path}: JSON nested too deeply to read; a manifest nests {MAX_DEPTH} levels at most") from None
    except ValueError as e:  # json.JSONDecodeError, and integers too long to convert
        raise BundleError(f"{path}: not valid JSON ({_shown(str(e))[1:-1]})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        got = data.get("schema") if isinstance(data, dict) else f"a JSON {_kind(data)}"
        raise BundleError(f"{path}: expected a manifest of schema {SCHEMA!r}, got {_shown(got)}")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise BundleError(f"{path}: unknown manifest schema_version {_shown(version)}; "
                          f"this ldm_runtime reads version {SCHEMA_VERSION}")
    return data


def check_manifest(data: dict, where: str | os.PathLike = MANIFEST_NAME) -> None:
    """Raise a ``BundleError`` naming the JSON path of the first problem in manifest ``data``."""
    _check_plain_json(data, where)
    _check_schema(data, where)
    _check_latent(data, where)
    _check_agreeing_dims(data, where)
    _check_conditioning(data, where)
    _check_batch_mult(data, where)
    _check_scheduler(data["scheduler"], where)


def _field_error(where: Any, path: str, problem: str) -> BundleError:
    return BundleError(f"{where}: manifest field {path or '(top level)'}: {problem}")


def _check_plain_json(data: Any, where: Any) -> None:
    """Finite numbers (JSON has no NaN or Infinity), valid Unicode, bounded nesting; iterative."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise _field_error(where, path, f"nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, float) and not math.isfinite(value):
            raise _field_error(where, path, f"expected a finite number, got {value} (not valid JSON)")
        if isinstance(value, str) and _SURROGATE.search(value):
            raise _field_error(where, path, "expected valid Unicode text, got a lone surrogate")
        if isinstance(value, dict):
            for key, item in value.items():
                if _SURROGATE.search(key):
                    raise _field_error(where, path, "expected valid Unicode keys, got one with a lone surrogate")
                stack.append((item, f"{path}.{_key(key)}" if path else _key(key), depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value))


def _key(key: str) -> str:
    return key if _PLAIN_KEY.fullmatch(key) else json.dumps(key[:60])


def _check_schema(data: dict, where: Any) -> None:
    import fastjsonschema

    try:
        _validator(data["schema_version"])(data)
    except fastjsonschema.JsonSchemaValueException as e:
        path = e.name[len("data."):] if e.name.startswith("data.") else e.name.replace("data", "", 1)
        problem = e.message[len(e.name):].strip()
        if e.rule in ("oneOf", "anyOf"):
            problem = "must be one of: " + " | ".join(_describe(d) for d in e.rule_definition)
        if e.rule == "propertyNames":
            problem = f"keys must be {_describe(e.rule_definition)}; got {_shown(_bad_names(e.value, e.rule_definition))}"
        if e.rule not in ("required", "additionalProperties", "propertyNames"):
            problem += f", got {_shown(e.value)}"
        raise _field_error(where, path, problem) from None


def _bad_names(obj: dict, definition: dict) -> list[str]:
    """The keys of ``obj`` that a ``propertyNames`` definition (an enum or a pattern) refuses."""
    if "enum" in definition:
        return [k for k in obj if k not in definition["enum"]]
    pattern = re.compile(definition.get("pattern", ""))
    return [k for k in obj if not pattern.search(k) or len(k) > definition.get("maxLength", len(k))]


def _describe(definition: dict) -> str:
    """A schema alternative in a few words: "integer >= 1", "string matching ^...$", "one of [...]"."""
    if "enum" in definition:
        return f"one of {definition['enum']}"
    words = [str(definition.get("description") or definition.get("type", "value"))]
    if "minimum" in definition:
        words.append(f">= {definition['minimum']}")
    if "pattern" in definition:
        words.append(f"matching {definition['pattern']}")
    return " ".join(words)


def _check_latent(data: dict, where: Any) -> None:
    """Factors the runtime uses in float32 must be finite there; the default size a multiple of the VAE factor."""
    import numpy as np

    tiny, big = float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max)
    latent = data["latent"]
    for key, positive in (("scaling_factor", True), ("shift_factor", False)):
        value = latent.get(key)
        if value is None:
            continue
        if abs(value) > big or (positive and value < tiny):
            raise _field_error(where, f"latent.{key}", f"expected a float32 number{' > 0' if positive else ''} "
                               f"(magnitude {tiny:.3g} to {big:.3g}), got {_shown(value)}")
    f = latent["vae_scale_factor"]
    for key in ("height", "width"):
        if data["default_size"][key] % f:
            raise _field_error(where, f"default_size.{key}", f"expected a multiple of latent.vae_scale_factor {f}, "
                               f"got {data['default_size'][key]}")


def _check_agreeing_dims(data: dict, where: Any) -> None:
    """Fixed tensor dimensions that repeat a ``latent`` or ``text`` field must equal it (AGREEING_DIMS)."""
    for field_path, component, kind, tensor, axis in AGREEING_DIMS:
        section, key = field_path.split(".")
        want = data[section][key]
        specs = data["components"].get(component, {}).get(kind, [])
        for i, spec in enumerate(specs):
            if spec["name"] != tensor or len(spec["shape"]) <= axis or isinstance(spec["shape"][axis], str):
                continue
            if spec["shape"][axis] != want:
                raise _field_error(where, f"components.{component}.{kind}[{i}].shape[{axis}]",
                                   f"{tensor!r} has {spec['shape'][axis]} there, but {field_path} is {want}; "
                                   "they must agree")


def _check_conditioning(data: dict, where: Any) -> None:
    """SDXL: each listed text encoder's tokenizer and outputs exist, the hidden widths sum to ``text.hidden_size``,
    the pooled width is the U-Net's ``text_embeds`` width and ``time_ids`` has 5 values iff
    ``requires_aesthetics_score``. Without ``conditioning``, a U-Net must not take SDXL's inputs."""
    comps, cond = data["components"], data.get("conditioning")
    unet = {s["name"]: s for s in comps.get("unet", {}).get("inputs", [])}
    if cond is None:
        if "text_embeds" in unet or "time_ids" in unet:
            raise _field_error(where, "conditioning", "the U-Net takes text_embeds and time_ids (SDXL), so the "
                               "manifest needs a conditioning entry saying which text encoders feed them; it has none")
        return
    widths, pooled = [], []
    for i, entry in enumerate(cond["text_encoders"]):
        at = f"conditioning.text_encoders[{i}]"
        if entry["tokenizer"] not in data:
            raise _field_error(where, f"{at}.tokenizer", f"names {entry['tokenizer']!r}, which the manifest does not have")
        if entry["component"] not in comps:
            continue  # a bundle of some components only
        outputs = {s["name"]: s for s in comps[entry["component"]]["outputs"]}
        for key in ("hidden", "pooled"):
            if key in entry and entry[key] not in outputs:
                raise _field_error(where, f"{at}.{key}", f"{entry['component']} has no output {entry[key]!r} "
                                   f"(its outputs are {sorted(outputs)})")
        widths.append(outputs[entry["hidden"]]["shape"][-1])
        pooled += [(at, outputs[entry["pooled"]]["shape"][-1])] if "pooled" in entry else []
    if len(widths) == len(cond["text_encoders"]) and all(isinstance(w, int) for w in widths) \
            and sum(widths) != data["text"]["hidden_size"]:
        raise _field_error(where, "text.hidden_size", f"expected the text encoders' hidden widths summed "
                           f"({' + '.join(map(str, widths))} = {sum(widths)}), got {data['text']['hidden_size']}")
    if sum("pooled" in e for e in cond["text_encoders"]) != 1:
        raise _field_error(where, "conditioning.text_encoders", "expected exactly one entry with 'pooled' "
                           "(the U-Net's text_embeds)")
    _check_unet_added(unet, pooled, cond["requires_aesthetics_score"], where)


def _check_unet_added(unet: dict, pooled: list[tuple[str, Any]], aesthetics: bool, where: Any) -> None:
    """The U-Net's ``text_embeds`` width is the pooled output's; its ``time_ids`` has 5 values with an aesthetic score, else 6."""
    if not unet:
        return
    for name in ("text_embeds", "time_ids"):
        if name not in unet:
            raise _field_error(where, "components.unet.inputs", f"an SDXL U-Net (the manifest has conditioning) "
                               f"takes {name!r}; this one's inputs are {sorted(unet)}")
    width = unet["text_embeds"]["shape"][-1]
    for at, w in pooled:
        if w != width:
            raise _field_error(where, f"{at}.pooled", f"the pooled output is {w} wide, but the U-Net's text_embeds "
                               f"is {width}; they must agree")
    k, want = unet["time_ids"]["shape"][-1], 5 if aesthetics else 6
    if k != want:
        raise _field_error(where, "components.unet.inputs", f"time_ids has {k} values per row, but "
                           f"requires_aesthetics_score={str(aesthetics).lower()} needs {want}")


def _check_batch_mult(data: dict, where: Any) -> None:
    """A recorded ``batch_mult`` must be the one the runtime's calls imply (``ComponentInfo.batch_mult``'s default)."""
    for name, entry in data["components"].items():
        if "batch_mult" not in entry:
            continue
        implied = ComponentInfo.from_dict(name, {k: v for k, v in entry.items() if k != "batch_mult"}).batch_mult
        if entry["batch_mult"] != implied:
            raise _field_error(where, f"components.{name}.batch_mult", f"expected {implied} (the rows per image the "
                               f"runtime feeds {name!r}), got {_shown(entry['batch_mult'])}")


def _check_scheduler(entry: dict, where: Any) -> None:
    """The bundle's scheduler: a name this runtime has, and a config it can honour (checked by building it)."""
    from . import schedulers

    name, config = entry["name"], entry["config"]
    if name not in schedulers.SCHEDULERS:
        raise _field_error(where, "scheduler.name", f"expected one of {', '.join(schedulers.SCHEDULERS)}, "
                           f"got {_shown(name)}")
    for key, value in config.items():
        if key in schedulers.SchedulerConfig.__dataclass_fields__:
            try:
                schedulers._check_value(key, value)
            except ValueError as e:
                raise _field_error(where, f"scheduler.config.{_key(key)}", str(e)[:300]) from None
    try:
        schedulers.make_scheduler(name, config).set_timesteps(1)
    except ValueError as e:
        raise _field_error(where, "scheduler.config", str(e)[:300]) from None
