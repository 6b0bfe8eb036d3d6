"""fp32 -> fp16 conversion of an ONNX graph, with numerically fragile parts kept in fp32.

Every node that computes on float data gets a precision: fp32 if the ``Fp16Policy`` keeps it,
fp16 otherwise. A float input whose type differs from its consumer's precision is converted at
the boundary: constants (initializers, ``Constant`` nodes) are converted once, ahead of time;
anything else gets a ``Cast`` node. Shape arithmetic (whatever hangs off ``Shape``/``Size`` and
constants only) is left alone, so sizes never round through fp16.

Which nodes stay fp32 (see ``policy_for`` and ``bench/fp16_sweep.py`` for the measurements):
- normalizations: GroupNorm exports as Reshape-InstanceNormalization-Reshape-Mul-Add and
  LayerNorm as LayerNormalization; their mean/variance reductions are where fp16 overflows
  (sum of squares of activations in the hundreds). Hand-written norms (Pow, ReduceMean, +eps,
  Sqrt) stay fp32 from the Pow through the Sqrt: storing the mean of squares is the overflow;
- the attention scores: MatMul(q, k) -> [Mul/Div/Add mask] -> Softmax, walked back from each
  Softmax. Large-head models (SD 2.x's ``upcast_attention``) overflow here;
- everything computed from fp32 graph inputs alone: the U-Net timestep (sin/cos of arguments up
  to 1000, where an fp16 argument is off by up to 0.25 rad) through its MLP and each resnet's
  time projection, a (B, C) side branch, so it costs nothing;
- optional name scopes (regexes on the exporter's ``/module/path/Op`` node names), e.g. the VAE
  decoder's last up-block and conv_out (``policy_for(..., decoder_fp32_tail=True)``; off by
  default: no random-weight measurement has needed it, see the sweep).

Measuring fp16 on onnxruntime's CPU provider needs care: it has no fp16 kernel for most ops and
runs them in fp32, dropping the casts between neighbours, so an overflow inside a chain never
shows. ``emulate_fp16`` builds the twin that stores every fp16 tensor as fp16; the parity gate
and the sweep run both.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

log = logging.getLogger(__name__)

FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16
FP16_MAX = float(np.finfo(np.float16).max)

# ops whose outputs carry no data (only shapes): what hangs off them is shape arithmetic
_SHAPE_OPS = {"Shape", "Size"}
# ops whose output type comes from an attribute, not from their inputs: never retyped
_TYPED_BY_ATTR = {"ConstantOfShape", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                  "EyeLike", "Multinomial", "Constant"}
# ops without fp16 in the ONNX spec (opset 18): computed in fp32 wherever they appear
_NO_FP16 = {"Range"}
# for ops with non-data inputs (shapes, axes, indices, scales), the input slots that carry the data;
# ops not listed take every input as data
_DATA_INPUTS: dict[str, tuple[int, ...]] = {
    "Resize": (0,), "Upsample": (0,), "Reshape": (0,), "Expand": (0,), "Slice": (0,), "Tile": (0,),
    "Gather": (0,), "GatherElements": (0,), "GatherND": (0,), "Unsqueeze": (0,), "Squeeze": (0,),
    "Split": (0,), "ReduceMean": (0,), "ReduceSum": (0,), "ReduceMax": (0,), "ReduceMin": (0,),
    "ReduceProd": (0,), "ReduceL2": (0,), "ReduceSumSquare": (0,), "Dropout": (0,), "Trilu": (0,),
    "Pad": (0, 2), "Where": (1, 2), "CumSum": (0,), "TopK": (0,), "ScatterND": (0, 2),
    "ScatterElements": (0, 2), "Pow": (0,), "OneHot": (2,), "Cast": (), "CastLike": (0,),
    "Shape": (), "Size": (), "ConstantOfShape": (), "NonZero": (0,),
}
# elementwise ops allowed between the score MatMul and its Softmax
_SCORE_CHAIN = {"Mul", "Div", "Add", "Sub", "Cast", "Where"}
# a kept reduction (a hand-written norm's mean of squares) stays fp32 through these, up to the
# square root: the statistic itself is what overflows, 1/sqrt of it is back in range
_REDUCTIONS = {"ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2"}
_STAT_CHAIN = {"Add", "Sub", "Max", "Clip", "Cast"}
_STAT_END = {"Sqrt", "Reciprocal"}


@dataclass(frozen=True)
class Fp16Policy:
    """What stays fp32 in an fp16 graph.

    keep_ops: op types computed in fp32 wherever they appear.
    keep_scopes: regexes searched in node names (the exporter names nodes by module path).
    fp32_io: graph inputs and outputs that keep type float32 (all other float IO becomes fp16).
    attention_fp32: keep each attention score MatMul and the ops up to its Softmax in fp32.
    fp32_input_branches: keep the subgraph that depends only on fp32 inputs (and constants) in fp32.
    """

    keep_ops: frozenset[str] = frozenset({"InstanceNormalization", "GroupNormalization", "LayerNormalization",
                                          "Softmax", "ReduceMean", "Pow", "Sqrt"})
    keep_scopes: tuple[str, ...] = ()
    fp32_io: frozenset[str] = frozenset()
    attention_fp32: bool = True
    fp32_input_branches: bool = True

    def to_dict(self) -> dict:
        return {"keep_ops": sorted(self.keep_ops), "keep_scopes": list(self.keep_scopes),
                "fp32_io": sorted(self.fp32_io), "attention_fp32": self.attention_fp32,
                "fp32_input_branches": self.fp32_input_branches}


def policy_for(component: str, vae_levels: int = 4, decoder_fp32_tail: bool = False) -> Fp16Policy:
    """The default policy of a component (decided by the measurements in bench/fp16_sweep.py)."""
    if component == "unet":
        return Fp16Policy(fp32_io=frozenset({"timestep"}))
    if component == "vae_decoder" and decoder_fp32_tail:
        # the decoder's last up-block runs at full resolution with the largest activations
        last = vae_levels - 1
        return Fp16Policy(keep_scopes=(rf"decoder/up_blocks\.{last}/", r"decoder/conv_norm_out", r"decoder/conv_out"))
    return Fp16Policy()


@dataclass
class Fp16Report:
    nodes_fp32: int = 0
    nodes_fp16: int = 0
    casts_added: int = 0
    constants_converted: int = 0
    clipped_values: int = 0
    fp32_op_types: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"nodes_fp32": self.nodes_fp32, "nodes_fp16": self.nodes_fp16, "casts_added": self.casts_added,
                "constants_converted": self.constants_converted, "clipped_values": self.clipped_values,
                "fp32_op_types": dict(sorted(self.fp32_op_types.items()))}


# ---------------------------------------------------------------------------------------------
# big models. Protobuf keeps a message's bytes in an arena that is freed only with the whole
# message: editing a 3 GB model in place (new raw_data, deleted tensors) never returns memory.
# So big graphs are rebuilt into a new message and the old one dropped, and shape inference
# (which serialises, capped at 2 GB) runs on a copy whose big tensors carry no data.

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


def _light(model: onnx.ModelProto, min_bytes: int = 1 << 16) -> onnx.ModelProto:
    """A copy whose tensors of ``min_bytes`` or more keep their type and dims but no data."""
    def strip(t: onnx.TensorProto) -> onnx.TensorProto:
        if len(t.raw_data) < min_bytes:
            return t
        light = onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims)
        return light
    m = rebuild(model, model.graph.node, (strip(t) for t in model.graph.initializer))
    m.graph.value_info.extend(model.graph.value_info)
    return m


def infer_types(model: onnx.ModelProto, strict: bool = False) -> onnx.ModelProto:
    """``onnx.shape_inference.infer_shapes`` that also works on models over 2 GB.

    Returns a light copy of ``model`` (big tensors without data) with ``value_info`` filled
    in: use it for types and shapes only.
    """
    return onnx.shape_inference.infer_shapes(_light(model), check_type=True, strict_mode=strict, data_prop=True)


def _elem_types(inferred: onnx.ModelProto) -> dict[str, int]:
    g = inferred.graph
    types: dict[str, int] = {}
    for vi in (*g.input, *g.output, *g.value_info):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    for t in g.initializer:
        types[t.name] = t.data_type
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    types[n.output[0]] = a.t.data_type
    return types


# ---------------------------------------------------------------------------------------------
# which nodes stay fp32

def _attention_score_nodes(nodes: list[onnx.NodeProto], producer: dict[str, int]) -> set[int]:
    """Indices of each Softmax's score MatMul and the elementwise ops between them."""
    keep: set[int] = set()
    for i, n in enumerate(nodes):
        if n.op_type != "Softmax":
            continue
        frontier, chain, found = [n.input[0]], [], False
        for _ in range(8):  # the chain is short (scale, mask, cast); stop rather than wander
            nxt = []
            for name in frontier:
                j = producer.get(name)
                if j is None:
                    continue
                op = nodes[j].op_type
                if op == "MatMul":
                    chain.append(j)
                    found = True
                elif op in _SCORE_CHAIN:
                    chain.append(j)
                    nxt.extend(nodes[j].input)
            if not nxt:
                break
            frontier = nxt
        if found:
            keep.update(chain)
    return keep


def _norm_stat_nodes(nodes: list[onnx.NodeProto], keep: set[int]) -> set[int]:
    """The ops after each kept reduction up to its Sqrt/Reciprocal (eps add, clamp)."""
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for x in n.input:
            consumers.setdefault(x, []).append(i)
    more: set[int] = set()
    for i in [i for i in keep if nodes[i].op_type in _REDUCTIONS]:
        frontier = list(nodes[i].output)
        for _ in range(4):
            nxt = []
            for o in frontier:
                for j in consumers.get(o, []):
                    op = nodes[j].op_type
                    if op in _STAT_CHAIN or op in _STAT_END:
                        more.add(j)
                        if op in _STAT_CHAIN:
                            nxt.extend(nodes[j].output)
            frontier = nxt
    return more


def _fp32_nodes(nodes: list[onnx.NodeProto], policy: Fp16Policy, data: list[bool], fp32_only: list[bool],
                producer: dict[str, int]) -> set[int]:
    scopes = [re.compile(s) for s in policy.keep_scopes]
    keep = {i for i, n in enumerate(nodes)
            if n.op_type in policy.keep_ops or n.op_type in _NO_FP16 or any(s.search(n.name) for s in scopes)}
    keep |= _norm_stat_nodes(nodes, keep)
    if policy.attention_fp32:
        keep |= _attention_score_nodes(nodes, producer)
    if policy.fp32_input_branches:
        keep |= {i for i, f in enumerate(fp32_only) if f and data[i]}
    return keep


# ---------------------------------------------------------------------------------------------
# the conversion

def convert_to_fp16(model: onnx.ModelProto, policy: Fp16Policy = Fp16Policy()) -> tuple[onnx.ModelProto, Fp16Report]:
    """Convert ``model`` (fp32) to fp16 following ``policy``; returns a new model and a report.

    The result declares fp16 for every float graph input/output not in ``policy.fp32_io``. It has
    no stale ``value_info`` (shape inference is re-run and must pass in strict mode). ``model``'s
    nodes are reused: do not use ``model`` afterwards.
    """
    g = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in g.node for a in n.attribute):
        raise NotImplementedError("fp16 conversion of graphs with subgraphs (If/Loop/Scan) is not supported")
    types = _elem_types(infer_types(model))
    nodes = list(g.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    init = {t.name: t for t in g.initializer}
    const_nodes = {n.output[0]: n for n in nodes if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    report = Fp16Report()

    # 1. data dependence (what flows from graph inputs other than through Shape/Size) and whether
    #    that flow comes from fp32 inputs only
    fp32_in = {i.name for i in g.input if i.name in policy.fp32_io}
    src_data = {i.name: True for i in g.input}  # tensor -> depends on graph-input data
    src_fp32_only = {i.name: i.name in fp32_in for i in g.input}
    data, fp32_only = [], []
    for n in nodes:
        ins = [x for x in n.input if x in src_data]
        d = n.op_type not in _SHAPE_OPS and any(src_data[x] for x in ins)
        f = d and all(src_fp32_only[x] for x in ins if src_data[x])
        data.append(d)
        fp32_only.append(f)
        for o in n.output:
            src_data[o], src_fp32_only[o] = d, f
    keep = _fp32_nodes(nodes, policy, data, fp32_only, producer)

    # 2. graph inputs
    cur = dict(types)  # tensor -> its type in the converted graph
    for vi in g.input:
        tt = vi.type.tensor_type
        if tt.elem_type == FLOAT and vi.name not in policy.fp32_io:
            tt.elem_type = FLOAT16
            cur[vi.name] = FLOAT16

    # 3. each compute node's precision, and the float data slots it reads
    plan: dict[int, tuple[int, list[int]]] = {}  # node -> (precision, float data input slots)
    for i, n in enumerate(nodes):
        if not data[i] or n.op_type in _TYPED_BY_ATTR:
            continue
        slots = _DATA_INPUTS.get(n.op_type, range(len(n.input)))
        float_in = [k for k in slots if k < len(n.input) and n.input[k] and cur.get(n.input[k]) in (FLOAT, FLOAT16)]
        if float_in or n.op_type == "Cast" or any(types.get(o) == FLOAT for o in n.output):
            plan[i] = (FLOAT if i in keep else FLOAT16, float_in)
    # an initializer read only as fp16 data is converted under its own name (no fp32 copy kept)
    wants: dict[str, set[int]] = {}
    for i, n in enumerate(nodes):
        prec, float_in = plan.get(i, (FLOAT, []))
        for k, x in enumerate(n.input):
            if x in init:
                wants.setdefault(x, set()).add(prec if k in float_in else init[x].data_type)
    in_place = {name for name, w in wants.items() if w == {FLOAT16} and init[name].data_type == FLOAT}
    for name in in_place:
        cur[name] = FLOAT16
    report.constants_converted += len(in_place)

    # 4. walk the nodes in order, converting at precision boundaries
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    converted: dict[tuple[str, int], str] = {}

    def as_type(name: str, to: int) -> str:
        key = (name, to)
        if key in converted:
            return converted[key]
        suffix = "fp16" if to == FLOAT16 else "fp32"
        src = init.get(name)
        if src is None and name in const_nodes:
            src = const_nodes[name].attribute[0].t
        if src is not None:  # a constant read in both precisions: a converted copy
            arr = numpy_helper.to_array(src)
            arr = _to_fp16(arr, report) if to == FLOAT16 else arr.astype(np.float32)
            new_inits.append(numpy_helper.from_array(arr, f"{name}__{suffix}"))
            report.constants_converted += 1
        else:
            new_nodes.append(helper.make_node("Cast", [name], [f"{name}__{suffix}"], to=to, name=f"{name}__cast_{suffix}"))
            report.casts_added += 1
        out = f"{name}__{suffix}"
        converted[key] = out
        cur[out] = to
        return out

    for i, n in enumerate(nodes):
        if i not in plan:
            new_nodes.append(n)
            continue
        prec, float_in = plan[i]
        if prec == FLOAT:
            report.nodes_fp32 += 1
            report.fp32_op_types[n.op_type] = report.fp32_op_types.get(n.op_type, 0) + 1
        else:
            report.nodes_fp16 += 1
        if n.op_type == "Cast":
            to = next(a for a in n.attribute if a.name == "to")
            if to.i in (FLOAT, FLOAT16):
                to.i = prec
                for o in n.output:
                    cur[o] = prec
            new_nodes.append(n)
            continue
        for k in float_in:
            if cur[n.input[k]] != prec:
                n.input[k] = as_type(n.input[k], prec)
        for o in n.output:
            if types.get(o) == FLOAT:
                cur[o] = prec
        new_nodes.append(n)

    # 5. graph outputs: retype, and cast where the producer's precision differs from the declared type
    renames: dict[str, str] = {}
    tail: list[onnx.NodeProto] = []
    for vi in g.output:
        tt = vi.type.tensor_type
        if tt.elem_type != FLOAT:
            continue
        want = FLOAT if vi.name in policy.fp32_io else FLOAT16
        tt.elem_type = want
        if cur.get(vi.name) != want:
            inner = f"{vi.name}__inner"
            renames[vi.name] = inner
            tail.append(helper.make_node("Cast", [inner], [vi.name], to=want, name=f"{vi.name}__cast_out"))
            report.casts_added += 1
    if renames:
        for n in new_nodes:
            for k, x in enumerate(n.input):
                if x in renames:
                    n.input[k] = renames[x]
            for k, x in enumerate(n.output):
                if x in renames:
                    n.output[k] = renames[x]
    # the converted model is a new message (see ``rebuild``); unused constants are left out
    needed = _needed(new_nodes + tail, {o.name for o in g.output})

    def initializers():
        for t in g.initializer:
            if t.name not in needed:
                continue
            if t.name in in_place:
                yield numpy_helper.from_array(_to_fp16(numpy_helper.to_array(t), report), t.name)
            else:
                yield t
        yield from (t for t in new_inits if t.name in needed)

    live = [n for n in new_nodes + tail if any(o in needed for o in n.output)]
    model = rebuild(model, live, initializers())
    _check_fp16_types(model)
    log.info("fp16: %d nodes fp16, %d fp32 (%s), %d casts, %d constants converted, %d values clipped",
             report.nodes_fp16, report.nodes_fp32, report.fp32_op_types, report.casts_added,
             report.constants_converted, report.clipped_values)
    return model, report


def emulate_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """An fp32 twin of an fp16 graph that rounds every fp16 tensor to fp16 where it is produced.

    onnxruntime's CPU provider has no fp16 kernel for most ops (Mul, Pow, Conv, ...): it computes
    them in fp32 and drops the casts between neighbours, so an fp16 overflow inside a chain of
    such ops never shows. This twin computes every op in fp32 and stores every tensor the fp16
    graph types as fp16 through an explicit Cast(fp16)->Cast(fp32) pair, which onnxruntime
    keeps: what a strongly typed fp16 engine (TensorRT) stores, with fp32 accumulation inside ops.
    Feed it fp32 arrays holding fp16 values; its outputs are fp32 holding fp16 values.
    """
    types = _elem_types(infer_types(model))
    new_nodes: list[onnx.NodeProto] = []
    for src in model.graph.node:
        n = onnx.NodeProto()
        n.CopyFrom(src)  # nodes are small; ``model`` stays usable
        for a in n.attribute:
            if n.op_type == "Cast" and a.name == "to" and a.i == FLOAT16:
                a.i = FLOAT
            elif a.name == "value" and a.type == onnx.AttributeProto.TENSOR and a.t.data_type == FLOAT16:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float32), a.t.name))
        rounded = []
        for k, o in enumerate(n.output):
            if o and types.get(o) == FLOAT16:
                n.output[k] = f"{o}__unrounded"
                rounded.append(o)
        new_nodes.append(n)
        for o in rounded:
            new_nodes.append(helper.make_node("Cast", [f"{o}__unrounded"], [f"{o}__h"], to=FLOAT16))
            new_nodes.append(helper.make_node("Cast", [f"{o}__h"], [o], to=FLOAT))
    inits = (numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name) if t.data_type == FLOAT16 else t
             for t in model.graph.initializer)
    twin = rebuild(model, new_nodes, inits)
    for vi in (*twin.graph.input, *twin.graph.output):
        if vi.type.tensor_type.elem_type == FLOAT16:
            vi.type.tensor_type.elem_type = FLOAT
    return twin


def _to_fp16(arr: np.ndarray, report: Fp16Report) -> np.ndarray:
    """fp32 values as fp16, finite values beyond fp16's range clipped to +-65504 (not inf)."""
    big = np.isfinite(arr) & (np.abs(arr) > FP16_MAX)
    n = int(big.sum())
    if n:
        report.clipped_values += n
        arr = np.where(big, np.sign(arr) * FP16_MAX, arr)
    return arr.astype(np.float16)


def _needed(nodes: list[onnx.NodeProto], outputs: set[str]) -> set[str]:
    """Names that the graph outputs depend on (node outputs and inputs, walking back)."""
    needed = set(outputs)
    for n in reversed(nodes):
        if any(o in needed for o in n.output):
            needed.update(x for x in n.input if x)
    return needed


def _check_fp16_types(model: onnx.ModelProto) -> None:
    """Strict shape inference over the converted graph: every type mismatch is an error here."""
    try:
        infer_types(model, strict=True)
    except onnx.shape_inference.InferenceError as e:
        raise ValueError(f"fp16 conversion produced an ill-typed graph: {e}") from None


def io_dtypes(model: onnx.ModelProto) -> dict[str, str]:
    """numpy dtype names of the graph's declared inputs and outputs."""
    out = {}
    for vi in (*model.graph.input, *model.graph.output):
        out[vi.name] = np.dtype(helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)).name
    return out
