"""Whole-model copies that stay cheap on models over 2 GB.

Protobuf keeps a message's bytes in an arena that is freed only with the whole message: editing
a 3 GB model in place (new raw_data, deleted tensors) never returns memory. So big graphs are
rebuilt into a new message and the old one dropped (``rebuild``), and shape inference (which
serialises, capped at 2 GB) runs on a copy whose big tensors carry no data (``infer_shapes``).
"""
from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np
import onnx
from onnx import helper

# Tensors under this size keep their data in the light copy. Data propagation reads the values of
# shape arithmetic's constants (Reshape targets, Slice bounds, axes, Resize scales): a few int64 or
# float each, never near 64 KiB. Weights above it need only their dtype and dims for inference, so
# a 3 GB U-Net's copy keeps only its biases and norm scales.
LIGHT_MIN_BYTES = 1 << 16


def _copy_fields(dst, src, skip: tuple[str, ...] = ()) -> None:
    for fd, val in src.ListFields():
        if fd.name in skip:
            continue
        if fd.is_repeated:
            getattr(dst, fd.name).extend(val)
        elif fd.message_type is not None:
            getattr(dst, fd.name).CopyFrom(val)
        else:
            setattr(dst, fd.name, val)


def rebuild(model: onnx.ModelProto, nodes: Iterable[onnx.NodeProto],
            initializers: Iterable[onnx.TensorProto]) -> onnx.ModelProto:
    """A new model with ``model``'s metadata, inputs and outputs, and the given nodes and
    initializers (no value_info: shape inference fills it again)."""
    new = onnx.ModelProto()
    _copy_fields(new, model, skip=("graph",))
    _copy_fields(new.graph, model.graph, skip=("node", "initializer", "value_info"))
    new.graph.node.extend(nodes)
    for t in initializers:  # one at a time: never two copies of all weights
        new.graph.initializer.append(t)
    return new


def _tensor_bytes(t: onnx.TensorProto) -> int:
    """Size of ``t``'s data from its dtype and dims (wherever the data is stored, even externally)."""
    itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    return int(np.prod(t.dims, dtype=np.int64)) * itemsize


def _strip(t: onnx.TensorProto) -> onnx.TensorProto:
    if _tensor_bytes(t) < LIGHT_MIN_BYTES:
        return t
    return onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims)


def light_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose tensors of ``LIGHT_MIN_BYTES`` or more keep their type and dims but no data."""
    m = rebuild(model, model.graph.node, (_strip(t) for t in model.graph.initializer))
    m.graph.value_info.extend(model.graph.value_info)
    return m


def infer_shapes(model: onnx.ModelProto, strict: bool = False,
                 input_shapes: Mapping[str, tuple[int, ...]] | None = None) -> onnx.ModelProto:
    """``onnx.shape_inference.infer_shapes`` (types checked, data propagated) that also works past 2 GB.

    Returns a light copy of ``model`` (see ``light_copy``) with ``value_info`` filled in: use it
    for types and shapes only. ``input_shapes`` pins the named graph inputs to concrete shapes.
    """
    m = light_copy(model)
    for inp in m.graph.input:
        for d, v in zip(inp.type.tensor_type.shape.dim, (input_shapes or {}).get(inp.name, ())):
            d.ClearField("dim_param")
            d.dim_value = int(v)
    return onnx.shape_inference.infer_shapes(m, check_type=True, strict_mode=strict, data_prop=True)
