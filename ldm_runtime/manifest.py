"""The bundle manifest: the one file the runtime reads to learn what it runs.

A bundle is a folder with ``manifest.json`` at its root and the files it names. The manifest is
written last (and atomically) by ``export``; a folder without one is not a bundle. The schema is
versioned: the runtime refuses versions it does not know.

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
          "nodes": {"before": 1234, "after": 987},   # graph clean-up
          "parity": {"metric": value, ...}           # measured at export against torch
        },
        "text_encoder": {...}, "vae_decoder": {...}, "vae_encoder": {...}
      },
      "latent": {"channels": 4, "scaling_factor": 0.18215, "vae_scale_factor": 8},
      "default_size": {"height": 512, "width": 512},
      "text": {"max_length": 77, "hidden_size": 768},
      "tokenizer": {"vocab": "tokenizer/vocab.json", "merges": "tokenizer/merges.txt",
                    "model_max_length": 77, "pad_token": "<|endoftext|>", ...},  # tokenizer.TOKENIZER_OPTIONS
      "scheduler": {"name": "pndm", "config": {...diffusers scheduler config keys...}},
      "engines": {"<key>": {"component": "unet", "file": "...", "onnx_sha256": "...", ...}}
    }

Symbolic dimensions are strings; fixed ones are ints. Older bundles may carry a component
``profile`` (shape ranges that nothing read; engine builds compute their own): it is ignored.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = "ldm-runtime-bundle"
SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
COMPONENTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")


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


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise BundleError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise BundleError(f"{path}: expected schema {SCHEMA!r}, got {data.get('schema') if isinstance(data, dict) else type(data).__name__!r}")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise BundleError(
                f"{path}: unknown manifest schema_version {version!r}; this ldm_runtime reads version {SCHEMA_VERSION}"
            )
        for key in ("files", "components", "latent", "tokenizer", "scheduler", "default_size", "text"):
            if key not in data:
                raise BundleError(f"{path}: missing required key {key!r}")
        m = cls(root=root, data=data)
        if verify:
            m.verify_files()
        return m

    def verify_files(self, names: list[str] | None = None) -> None:
        """Check that every listed file exists with its recorded size and sha256."""
        files = self.data["files"]
        for rel in names if names is not None else list(files):
            rec = files.get(rel)
            if rec is None:
                raise BundleError(f"{self.root}: file {rel!r} is not listed in the manifest")
            p = self.root / rel
            if not p.is_file():
                raise BundleError(f"{self.root}: missing file {rel!r} named in the manifest")
            size = p.stat().st_size
            if "bytes" in rec and size != rec["bytes"]:
                raise BundleError(f"{p}: size mismatch: manifest says {rec['bytes']} bytes, file has {size}")
            digest = sha256_file(p)
            if digest != rec["sha256"]:
                raise BundleError(f"{p}: sha256 mismatch: manifest says {rec['sha256'][:16]}..., file is {digest[:16]}...")

    # -- accessors -------------------------------------------------------------------------
    def path(self, rel: str) -> Path:
        return self.root / rel

    @property
    def precision(self) -> str:
        return self.data.get("precision", "fp32")

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
