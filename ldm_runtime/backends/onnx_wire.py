"""The external-data locations an ONNX model names, read from its protobuf bytes without the onnx package.

onnxruntime resolves a tensor's ``location`` relative to the model file, and a model opened from
bytes relative to nothing the runtime controls; so before a session opens, the runtime lists every
location the graph names (initializers, sparse initializers, constant attributes, subgraphs,
functions) and accepts only those the manifest declares. Only the protobuf wire format is parsed:
message fields this walk does not descend into are skipped by their length, so weights held inline
are never decoded.
"""
from __future__ import annotations

# message -> {field number: message kind it holds} for the fields that can lead to a TensorProto
# (field numbers from onnx.proto; tests/test_bundle_security.py checks them against the onnx package)
_FIELDS: dict[str, dict[int, str]] = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "function": {7: "node", 11: "attribute"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
    "tensor": {13: "entry"},
    "entry": {},
}
MAX_DEPTH = 64  # nested subgraphs; a deeper model is refused rather than walked


class WireError(ValueError):
    """Bytes that are not a well-formed protobuf message."""


def _varint(buf: memoryview, i: int, end: int) -> tuple[int, int]:
    if i < end and buf[i] < 0x80:  # most keys and small lengths: one byte
        return buf[i], i + 1
    value, shift = 0, 0
    while True:
        if i >= end or shift > 63:
            raise WireError("truncated or overlong varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _fields(buf: memoryview, start: int, end: int):
    """(field number, wire type, value or (start, end) of a length-delimited field) of one message."""
    i = start
    while i < end:
        key, i = _varint(buf, i, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i, end)
            yield number, wire, value
        elif wire == 2:
            n, i = _varint(buf, i, end)
            if i + n > end:
                raise WireError("length-delimited field runs past its message")
            yield number, wire, (i, i + n)
            i += n
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
            if i > end:
                raise WireError("fixed-width field runs past its message")
        else:
            raise WireError(f"unsupported wire type {wire}")


def _entry(buf: memoryview, start: int, end: int) -> tuple[str, str]:
    parts = {1: "", 2: ""}
    for number, wire, value in _fields(buf, start, end):
        if number in parts and wire == 2:
            parts[number] = bytes(buf[value[0]:value[1]]).decode("utf-8", errors="replace")
    return parts[1], parts[2]


def _walk(buf: memoryview, start: int, end: int, kind: str, depth: int, out: list[str]) -> None:
    if depth > MAX_DEPTH:
        raise WireError(f"messages nested deeper than {MAX_DEPTH}")
    children = _FIELDS[kind]
    for number, wire, value in _fields(buf, start, end):
        child = children.get(number)
        if child is None or wire != 2:
            continue
        if child == "entry":
            key, location = _entry(buf, *value)
            if key == "location":
                out.append(location)
        else:
            _walk(buf, value[0], value[1], child, depth + 1, out)


def external_data_locations(model: bytes) -> list[str]:
    """Every ``location`` an ONNX ``ModelProto``'s tensors name, in order, with repeats removed.

    Raises ``WireError`` for bytes that are not a well-formed protobuf message.
    """
    if b"location" not in model:  # every entry naming a file has this key: no external data
        return []
    out: list[str] = []
    buf = memoryview(model)
    _walk(buf, 0, len(buf), "model", 0, out)
    return list(dict.fromkeys(out))
