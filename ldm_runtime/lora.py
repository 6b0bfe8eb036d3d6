"""LoRA files as users bring them, read without torch, and the weight deltas they add.

``read_lora(path)`` parses one safetensors file in any of the three formats in use:

- peft / current diffusers: ``unet.<module>.lora_A.weight`` / ``.lora_B.weight``; alpha (and
  ``alpha_pattern`` / ``rank_pattern`` / ``use_rslora``) in the ``lora_adapter_metadata`` JSON of
  the file's metadata, or absent;
- older diffusers: ``<module>.lora.down.weight`` / ``.lora.up.weight``, text encoders'
  ``.lora_linear_layer.down.weight``, and attention processors' ``to_q_lora.down.weight``;
- kohya / A1111: ``lora_unet_<module with _>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``;
  ``lora_te_`` (SD 1.x), ``lora_te1_`` / ``lora_te2_`` (SDXL); SDXL U-Nets in sgm names
  (``lora_unet_input_blocks_4_1_...``) given the U-Net's ``layers_per_block``.

Every module is keyed by the parameter it changes, with the component as prefix:
``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight``,
``text_encoder.text_model.encoder.layers.0.self_attn.q_proj.weight``, ``text_encoder_2.…``.
``lora_deltas`` sums the deltas of several files at their scales, by diffusers' rule
``delta W = scale * (alpha / rank) * up @ down`` (alpha = rank when the file has none).

Anything that cannot be applied exactly (DoRA's ``dora_scale``, LyCORIS LoKr/LoHa/IA3, biases,
unknown keys, a pickle file, a truncated file) is a ``LoraError`` naming the file and the key:
nothing is dropped.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

METADATA_KEY = "lora_adapter_metadata"  # diffusers' key in the safetensors metadata
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")  # what a LoRA changes, the prefix of its targets
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}

# safetensors dtype -> numpy; BF16 has no numpy dtype and is widened by hand
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
           "I16": np.int16, "I8": np.int8, "U8": np.uint8}
_FLOATS = ("F64", "F32", "F16", "BF16")
_MAX_HEADER = 100 << 20

# Module names with an underscore in diffusers' U-Net and transformers' CLIP: a kohya name has
# every "." turned into "_", and these are put back together (longest first).
_COMPOUNDS = frozenset({
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
    "proj_in", "proj_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "conv_norm_out",
    "time_embedding", "linear_1", "linear_2", "add_embedding", "cond_proj", "class_embedding",
    "encoder_hid_proj", "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj",
    "layer_norm1", "layer_norm2", "final_layer_norm", "text_projection", "token_embedding",
    "position_embedding",
})

# The sgm (LDM) ResBlock's layers that hold weights a LoRA can change, by diffusers' name.
_SGM_RESNET = {"in_layers_2": "conv1", "out_layers_3": "conv2", "emb_layers_1": "time_emb_proj",
               "skip_connection": "conv_shortcut"}
_SGM_TOP = {"input_blocks_0_0": "conv_in", "out_2": "conv_out", "time_embed_0": "time_embedding.linear_1",
            "time_embed_2": "time_embedding.linear_2", "label_emb_0_0": "add_embedding.linear_1",
            "label_emb_0_2": "add_embedding.linear_2"}
_SGM_MIDDLE = {"0": "resnets.0", "1": "attentions.0", "2": "resnets.1"}

# Keys of adapter kinds that are not a plain low-rank product, and why they are refused.
_UNSUPPORTED = (("dora_scale", "DoRA (dora_scale) rescales the fused weight; it is not a low-rank delta"),
                ("lora_magnitude_vector", "DoRA (lora_magnitude_vector) is not a low-rank delta"),
                ("lokr_", "LyCORIS LoKr is not a LoRA"), ("hada_", "LyCORIS LoHa is not a LoRA"),
                ("ia3", "IA3 is not a LoRA"), (".diff", "a full weight difference is not a LoRA"),
                ("bias", "LoRA biases are not applied"))

_COMPONENT = "(" + "|".join(COMPONENTS) + ")"
_PEFT = re.compile(rf"^{_COMPONENT}\.(.+)\.lora_(A|B)\.weight$")
_OLD = re.compile(rf"^{_COMPONENT}\.(.+)\.(?:lora|lora_linear_layer)\.(down|up)\.weight$")
_PROCS = re.compile(rf"^{_COMPONENT}\.(.+?)(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_KOHYA = re.compile(r"^(lora_unet_|lora_te_|lora_te1_|lora_te2_)(\w+)\.(lora_down\.weight|lora_up\.weight|alpha)$")
_KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
_PROC_TARGETS = {"unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"},
                 "text": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}}


class LoraError(ValueError):
    """A LoRA file, key or scale that cannot be applied; the message names the file and the key."""


@dataclass(frozen=True, eq=False)
class LoraModule:
    """One low-rank pair: ``down`` (r, in) or (r, in, kh, kw), ``up`` (out, r) or (out, r, 1, 1),
    float32; ``alpha`` None means alpha = rank. ``key`` is the file's key for it."""

    down: np.ndarray
    up: np.ndarray
    alpha: float | None
    key: str
    rslora: bool = False

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scaling(self) -> float:
        """alpha / rank (alpha / sqrt(rank) for rsLoRA), the factor diffusers and peft fuse with."""
        alpha = self.rank if self.alpha is None else self.alpha
        return alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def product(self) -> np.ndarray:
        """up @ down in float64, shaped as the weight it changes: (out, in) or (out, in, kh, kw)."""
        up, down = self.up.astype(np.float64), self.down.astype(np.float64)
        if down.ndim == 2:
            return up @ down
        return np.einsum("or,rikl->oikl", up[:, :, 0, 0], down)


@dataclass(frozen=True, eq=False)
class LoraFile:
    """A parsed LoRA file: its path, sha256, format ("peft", "diffusers-old" or "kohya") and modules."""

    path: Path
    sha256: str
    format: str
    modules: dict[str, LoraModule]


def read_lora(path: str | Path, *, unet_layers_per_block: int | None = None) -> LoraFile:
    """Read one LoRA safetensors file (never unpickled). ``unet_layers_per_block`` is the U-Net's
    (``layers_per_block(shapes)``), needed only for SDXL kohya files in sgm names."""
    path = Path(path)
    data = _read_bytes(path)
    tensors, metadata = _parse_safetensors(path, data)
    if not tensors:
        raise LoraError(f"LoRA file {path}: holds no tensors")
    fmt = _file_format(path, tensors)
    if fmt == "kohya":
        modules = _kohya_modules(path, tensors, unet_layers_per_block)
    else:
        modules = _diffusers_modules(path, tensors, _peft_configs(path, metadata))
    return LoraFile(path=path, sha256=hashlib.sha256(data).hexdigest(), format=fmt, modules=modules)


def lora_deltas(loras: list[tuple[LoraFile, float]], shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """The summed float32 delta per target parameter of ``loras`` at their scales, each shaped as
    ``shapes[key]`` (the bundle's weights, keyed as ``LoraFile.modules``)."""
    for lora, scale in loras:
        _check_scale(lora, scale)
        for name, module in lora.modules.items():
            _check_target(lora, name, module, shapes)
    sums: dict[str, np.ndarray] = {}
    for lora, scale in loras:
        for name, module in lora.modules.items():
            delta = (float(scale) * module.scaling) * module.product()
            sums[name] = sums[name] + delta if name in sums else delta
    return {name: delta.astype(np.float32) for name, delta in sums.items()}


def layers_per_block(shapes: Iterable[str]) -> int | None:
    """The U-Net's ``layers_per_block``, counted from its first down block's ResNets in a set of
    parameter names keyed as ``LoraFile.modules``; None when there are none."""
    found = {int(m.group(1)) for name in shapes if (m := re.match(r"unet\.down_blocks\.0\.resnets\.(\d+)\.", name))}
    return max(found) + 1 if found else None


# -- the safetensors container --------------------------------------------------------------------

def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise LoraError(f"LoRA file {path}: cannot be read ({e.strerror or e})") from None


def _parse_safetensors(path: Path, data: bytes) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors (as float32, or their integer dtype) and the string metadata of a safetensors file."""
    if len(data) < 8:
        raise LoraError(f"LoRA file {path}: {len(data)} bytes, too short for a safetensors file (truncated?)")
    n = int.from_bytes(data[:8], "little")
    if n > _MAX_HEADER or 8 + n > len(data):
        _refuse_pickle(path, data)
        raise LoraError(f"LoRA file {path}: header of {n} bytes does not fit in a file of {len(data)} bytes "
                        "(not safetensors, or truncated)")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        _refuse_pickle(path, data)
        raise LoraError(f"LoRA file {path}: the safetensors header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise LoraError(f"LoRA file {path}: the safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise LoraError(f"LoRA file {path}: __metadata__ is not a JSON object")
    body = memoryview(data)[8 + n:]
    return {key: _tensor(path, key, info, body) for key, info in header.items()}, metadata


def _refuse_pickle(path: Path, data: bytes) -> None:
    """Name what a file that is not safetensors looks like, when it is torch.save's zip or a pickle."""
    if data[:4] == b"PK\x03\x04" or data[:1] == b"\x80":
        raise LoraError(f"LoRA file {path}: a PyTorch pickle/zip file (.pt/.ckpt/.bin), not safetensors; "
                        "pickles are never loaded: convert it to .safetensors")


def _tensor(path: Path, key: str, info: Any, body: memoryview) -> np.ndarray:
    where = f"LoRA file {path}: tensor {key!r}"
    if not _is_entry(info):
        raise LoraError(f"{where}: header entry {str(info)[:120]} is not {{dtype, shape, data_offsets}}")
    dtype, shape, (begin, end) = info.get("dtype"), tuple(info["shape"]), info["data_offsets"]
    if dtype not in _DTYPES and dtype != "BF16":
        raise LoraError(f"{where}: dtype {dtype!r}, expected one of {sorted(_DTYPES) + ['BF16']}")
    itemsize = 2 if dtype == "BF16" else np.dtype(_DTYPES[dtype]).itemsize
    if end > len(body):
        raise LoraError(f"{where}: data ends at byte {end} of {len(body)} (the file is truncated)")
    if end - begin != itemsize * math.prod(shape):
        raise LoraError(f"{where}: {end - begin} bytes for shape {list(shape)} of {dtype}")
    raw = body[begin:end]
    if dtype == "BF16":  # the high half of a float32
        return (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
    array = np.frombuffer(raw, dtype=np.dtype(_DTYPES[dtype]).newbyteorder("<")).reshape(shape)
    return array.astype(np.float32) if dtype in _FLOATS else array


def _is_entry(info: Any) -> bool:
    """A header entry as safetensors writes it: {"dtype", "shape": [n, ...], "data_offsets": [begin, end]}."""
    if not isinstance(info, dict):
        return False
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not (isinstance(shape, list) and isinstance(offsets, list) and len(offsets) == 2):
        return False
    return all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in shape + offsets)


# -- formats --------------------------------------------------------------------------------------

def _file_format(path: Path, tensors: dict[str, np.ndarray]) -> str:
    """The one format all keys are in; the first key that is in none, or in another, is refused."""
    first: tuple[str, str] | None = None
    for key in tensors:
        _refuse_unsupported(path, key)
        fmt = _key_format(key)
        if fmt is None:
            raise LoraError(f"LoRA file {path}: key {key!r} is not a LoRA key of the peft, diffusers or kohya "
                            "formats (lora_A/lora_B, lora.down/lora.up, lora_down/lora_up/alpha)")
        if first is None:
            first = (key, fmt)
        elif fmt != first[1]:
            raise LoraError(f"LoRA file {path}: key {key!r} is in the {fmt} format, {first[0]!r} in {first[1]}")
    assert first is not None
    return first[1]


def _refuse_unsupported(path: Path, key: str) -> None:
    for marker, why in _UNSUPPORTED:
        if marker in key:
            raise LoraError(f"LoRA file {path}: key {key!r} cannot be applied: {why}")


def _key_format(key: str) -> str | None:
    if _KOHYA.match(key):
        return "kohya"
    if _PEFT.match(key):
        return "peft"
    if _OLD.match(key) or _PROCS.match(key):
        return "diffusers-old"
    return None


def _target(component: str, module: str) -> str:
    """The parameter name a LoRA on ``module`` changes; text encoders under ``text_model.`` as
    transformers' CLIP writes its checkpoints."""
    if component != "unet" and module.startswith(("encoder.", "embeddings.", "final_layer_norm")):
        module = "text_model." + module
    return f"{component}.{module}.weight"


def _diffusers_modules(path: Path, tensors: dict[str, np.ndarray], configs: dict[str, dict]) -> dict[str, LoraModule]:
    pairs: dict[str, dict[str, tuple[str, np.ndarray]]] = {}
    paths: dict[str, tuple[str, str]] = {}
    for key, array in tensors.items():
        component, module, role = _diffusers_key(key)
        name = _target(component, module)
        pairs.setdefault(name, {})
        if role in pairs[name]:
            raise LoraError(f"LoRA file {path}: keys {pairs[name][role][0]!r} and {key!r} both give the {role} "
                            f"weight of {name}")
        pairs[name][role] = (key, array)
        paths[name] = (component, module)
    modules = {}
    for name, pair in pairs.items():
        down_key, down, up = _pair(path, pair)
        component, module = paths[name]
        alpha, rslora = _peft_alpha(path, down_key, configs.get(component), module, down.shape[0])
        modules[name] = _module(path, down_key, down, up, alpha, rslora)
    return modules


def _diffusers_key(key: str) -> tuple[str, str, str]:
    """(component, module path, "down" | "up") of a peft or older diffusers key."""
    if m := _PEFT.match(key):
        return m.group(1), m.group(2), "down" if m.group(3) == "A" else "up"
    if m := _PROCS.match(key):
        component, parent, proj, role = m.groups()
        targets = _PROC_TARGETS["unet" if component == "unet" else "text"]
        return component, f"{parent}.{targets[proj]}", role
    m = _OLD.match(key)
    assert m is not None
    return m.group(1), m.group(2), m.group(3)


def _pair(path: Path, pair: dict[str, tuple[str, np.ndarray]]) -> tuple[str, np.ndarray, np.ndarray]:
    """(down key, down, up) of one module; a half without the other is refused."""
    for role, other in (("down", "up"), ("up", "down")):
        if other not in pair:
            raise LoraError(f"LoRA file {path}: key {pair[role][0]!r} has no matching {other} weight")
    (down_key, down), (_, up) = pair["down"], pair["up"]
    return down_key, down, up


def _peft_configs(path: Path, metadata: dict[str, str]) -> dict[str, dict]:
    """Per component, the peft ``LoraConfig`` fields diffusers saved (``unet.lora_alpha`` -> {"lora_alpha": ...})."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except (TypeError, json.JSONDecodeError) as e:
        raise LoraError(f"LoRA file {path}: metadata {METADATA_KEY!r} is not JSON ({e})") from None
    if not isinstance(flat, dict):
        raise LoraError(f"LoRA file {path}: metadata {METADATA_KEY!r} is not a JSON object")
    configs: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, field = str(key).partition(".")
        configs.setdefault(component, {})[field] = value
    for component, config in configs.items():
        if config.get("use_dora"):
            raise LoraError(f"LoRA file {path}: metadata '{component}.use_dora' is true: DoRA is not a low-rank "
                            "delta and cannot be applied")
    return configs


def _peft_alpha(path: Path, key: str, config: dict | None, module: str, rank: int) -> tuple[float | None, bool]:
    """(alpha, rsLoRA) of one module as peft builds it from the saved config: the first
    ``alpha_pattern`` / ``rank_pattern`` entry matching the module path, else ``lora_alpha`` / ``r``.
    No config: (None, False), i.e. alpha = rank, as diffusers loads such files."""
    if config is None:
        return None, False
    alpha = _number(path, key, "lora_alpha", _pattern_value(path, key, config, "alpha_pattern", module,
                                                            config.get("lora_alpha")))
    want_rank = _pattern_value(path, key, config, "rank_pattern", module, config.get("r"))
    if want_rank is not None and want_rank != rank:
        raise LoraError(f"LoRA file {path}: key {key!r} has rank {rank} but its metadata says r = {want_rank}")
    return alpha, bool(config.get("use_rslora", False))


def _pattern_value(path: Path, key: str, config: dict, field: str, module: str, default: Any) -> Any:
    patterns = config.get(field) or {}
    if not isinstance(patterns, dict):
        raise LoraError(f"LoRA file {path}: metadata {field!r} is not a JSON object")
    for pattern, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({pattern})$", module):
                return value
        except re.error as e:
            raise LoraError(f"LoRA file {path}: metadata {field} pattern {pattern!r} is not a regex ({e})") from None
    return default


def _number(path: Path, key: str, what: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value == 0:
        raise LoraError(f"LoRA file {path}: {what} for key {key!r} is {value!r}, expected a finite non-zero number")
    return float(value)


def _kohya_modules(path: Path, tensors: dict[str, np.ndarray], unet_layers_per_block: int | None
                   ) -> dict[str, LoraModule]:
    groups: dict[tuple[str, str], dict[str, tuple[str, np.ndarray]]] = {}
    for key, array in tensors.items():
        m = _KOHYA.match(key)
        assert m is not None
        prefix, name, part = m.groups()
        groups.setdefault((prefix, name), {})[_KOHYA_PARTS[part]] = (key, array)
    modules: dict[str, LoraModule] = {}
    for (prefix, name), group in groups.items():
        if "down" not in group and "up" not in group:
            raise LoraError(f"LoRA file {path}: key {group['alpha'][0]!r} has no lora_down/lora_up weights")
        down_key, down, up = _pair(path, group)
        target = _kohya_target(path, down_key, KOHYA_PREFIXES[prefix], name, unet_layers_per_block)
        if target in modules:
            raise LoraError(f"LoRA file {path}: keys {modules[target].key!r} and {down_key!r} both change {target}")
        alpha = _kohya_alpha(path, group["alpha"]) if "alpha" in group else None
        modules[target] = _module(path, down_key, down, up, alpha, False)
    return modules


def _kohya_alpha(path: Path, entry: tuple[str, np.ndarray]) -> float | None:
    key, array = entry
    if array.size != 1:
        raise LoraError(f"LoRA file {path}: key {key!r} has shape {list(array.shape)}, expected one number")
    value = float(array.reshape(()))
    if not math.isfinite(value) or value == 0:
        # kohya reads 0 as alpha = rank, diffusers as a zero delta: refused rather than guessed
        raise LoraError(f"LoRA file {path}: key {key!r} is {value}, expected a finite non-zero alpha")
    return value


def _kohya_target(path: Path, key: str, component: str, rest: str, unet_layers_per_block: int | None) -> str:
    """The parameter a kohya module name (``rest``: after ``lora_unet_`` etc.) changes."""
    if component != "unet":
        return _target(component, _kohya_path(rest))
    if rest in _SGM_TOP or rest.startswith(("input_blocks_", "middle_block_", "output_blocks_")):
        module = _sgm_path(rest, unet_layers_per_block)
        if module is None:
            if unet_layers_per_block is None and rest.startswith(("input_blocks_", "output_blocks_")):
                raise LoraError(f"LoRA file {path}: key {key!r} uses SDXL's sgm block names; reading it needs the "
                                "U-Net's layers_per_block (read_lora(..., unet_layers_per_block=N))")
            raise LoraError(f"LoRA file {path}: key {key!r}: no diffusers module for the sgm name {rest!r}")
        return _target(component, module)
    return _target(component, _kohya_path(rest))


def _kohya_path(name: str) -> str:
    """``down_blocks_0_attentions_0_proj_in`` -> ``down_blocks.0.attentions.0.proj_in``."""
    tokens, parts, i = name.split("_"), [], 0
    while i < len(tokens):
        n = next((n for n in (3, 2) if i + n <= len(tokens) and "_".join(tokens[i:i + n]) in _COMPOUNDS), 1)
        parts.append("_".join(tokens[i:i + n]))
        i += n
    return ".".join(parts)


def _sgm_path(name: str, lpb: int | None) -> str | None:
    """diffusers' module path for an sgm (LDM) U-Net name, as diffusers maps SDXL kohya files:
    ``input_blocks_4_1_proj_in`` -> ``down_blocks.1.attentions.0.proj_in`` (layers_per_block 2)."""
    if name in _SGM_TOP:
        return _SGM_TOP[name]
    if m := re.fullmatch(r"middle_block_(\d+)_(\w+)", name):
        inner = _SGM_MIDDLE.get(m.group(1))
        return None if inner is None else _sgm_inner(f"mid_block.{inner}", m.group(2))
    m = re.fullmatch(r"(input|output)_blocks_(\d+)_(\d+)_(\w+)", name)
    if m is None or lpb is None:
        return None
    side, i, j, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    if side == "input":
        block, layer = divmod(i - 1, lpb + 1)
        if rest == "op":
            return f"down_blocks.{block}.downsamplers.0.conv"
        kind = {0: "resnets", 1: "attentions"}.get(j)
        return None if kind is None else _sgm_inner(f"down_blocks.{block}.{kind}.{layer}", rest)
    block, layer = divmod(i, lpb + 1)
    if rest == "conv":
        return f"up_blocks.{block}.upsamplers.0.conv"
    kind = {0: "resnets", 1: "attentions"}.get(j)
    return None if kind is None else _sgm_inner(f"up_blocks.{block}.{kind}.{layer}", rest)


def _sgm_inner(prefix: str, rest: str) -> str | None:
    if ".resnets." in prefix:
        return f"{prefix}.{_SGM_RESNET[rest]}" if rest in _SGM_RESNET else None
    return f"{prefix}.{_kohya_path(rest)}"


def _module(path: Path, key: str, down: np.ndarray, up: np.ndarray, alpha: float | None, rslora: bool) -> LoraModule:
    """A checked pair: matching ranks, 2-D or conv-shaped, finite."""
    conv = down.ndim == 4 and up.ndim == 4 and up.shape[2:] == (1, 1)
    if not (down.ndim == up.ndim == 2 or conv) or up.shape[1] != down.shape[0] or down.shape[0] == 0:
        raise LoraError(f"LoRA file {path}: key {key!r}: down {list(down.shape)} and up {list(up.shape)} are not a "
                        "LoRA pair (down (r, in) / up (out, r), or down (r, in, kh, kw) / up (out, r, 1, 1))")
    if not (np.isfinite(down).all() and np.isfinite(up).all()):
        raise LoraError(f"LoRA file {path}: key {key!r} (or its up weight) holds non-finite values")
    return LoraModule(down=down, up=up, alpha=alpha, key=key, rslora=rslora)


# -- applying -------------------------------------------------------------------------------------

def _check_scale(lora: LoraFile, scale: Any) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)) \
            or not math.isfinite(float(scale)):
        raise LoraError(f"LoRA file {lora.path}: scale {scale!r}, expected a finite number")


def _check_target(lora: LoraFile, name: str, module: LoraModule, shapes: dict[str, tuple[int, ...]]) -> None:
    if name not in shapes:
        raise LoraError(f"LoRA file {lora.path}: key {module.key!r} targets {name}, which is not a weight of this "
                        "bundle that a LoRA can change (a LoRA for another model?)")
    want = tuple(shapes[name])
    got = (module.up.shape[0], *module.down.shape[1:])
    if got != want:
        raise LoraError(f"LoRA file {lora.path}: key {module.key!r} makes a delta of shape {list(got)} for {name}, "
                        f"whose shape is {list(want)} (a LoRA for another model?)")
