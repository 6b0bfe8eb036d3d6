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
  time projection, a (B, C) side branch, so it costs nothing; likewise SDXL's ``time_ids`` (pixel
  sizes up to 1024 and more) up to where their sinusoids meet the fp16 ``text_embeds``;
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
from typing import Iterable, Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .graph_copy import infer_shapes, rebuild

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
        # SDXL's time_ids (sizes up to 1024, as timesteps are) go through sinusoids as the timestep does
        return Fp16Policy(fp32_io=frozenset({"timestep", "time_ids"}))
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
# the conversion, in five steps

def convert_to_fp16(model: onnx.ModelProto, policy: Fp16Policy = Fp16Policy()) -> tuple[onnx.ModelProto, Fp16Report]:
    """Convert ``model`` (fp32) to fp16 following ``policy``; returns a new model and a report.

    The result declares fp16 for every float graph input/output not in ``policy.fp32_io``. It has
    no stale ``value_info`` (shape inference is re-run and must pass in strict mode). ``model``'s
    nodes are reused: do not use ``model`` afterwards.
    """
    g = model.graph
    _refuse_subgraphs(g)
    types = _elem_types(infer_shapes(model))
    nodes = list(g.node)
    init = {t.name: t for t in g.initializer}
    report = Fp16Report()
    data, fp32_only = _data_flow(g, nodes, policy.fp32_io)  # 1. what computes on input data
    keep = _fp32_nodes(nodes, policy, data, fp32_only, _producers(nodes))
    cur = _retype_inputs(g, policy.fp32_io, types)  # 2. graph inputs
    plan = _plan(nodes, data, keep, types, cur)  # 3. each compute node's precision
    in_place = _fp16_in_place(nodes, plan, init)
    cur.update(dict.fromkeys(in_place, FLOAT16))
    report.constants_converted += len(in_place)
    # 4. the nodes in order, converted at precision boundaries; 5. graph outputs
    new_nodes, new_inits = _convert_nodes(nodes, plan, types, cur, _constants(init, nodes), report)
    new_nodes += _retype_outputs(g, policy.fp32_io, cur, new_nodes, report)
    model = _assemble(model, new_nodes, new_inits, in_place, report)
    _check_fp16_types(model)
    log.info("fp16: %d nodes fp16, %d fp32 (%s), %d casts, %d constants converted, %d values clipped",
             report.nodes_fp16, report.nodes_fp32, report.fp32_op_types, report.casts_added,
             report.constants_converted, report.clipped_values)
    return model, report


def _refuse_subgraphs(g: onnx.GraphProto) -> None:
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in g.node for a in n.attribute):
        raise NotImplementedError("fp16 conversion of graphs with subgraphs (If/Loop/Scan) is not supported")


def _producers(nodes: list[onnx.NodeProto]) -> dict[str, int]:
    return {o: i for i, n in enumerate(nodes) for o in n.output if o}


def _constants(init: dict[str, onnx.TensorProto], nodes: list[onnx.NodeProto]) -> dict[str, onnx.TensorProto]:
    """Every constant tensor by name: initializers, and ``Constant`` nodes' values."""
    values = {n.output[0]: n.attribute[0].t for n in nodes
              if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    return {**values, **init}


def _data_flow(g: onnx.GraphProto, nodes: list[onnx.NodeProto], fp32_io: frozenset[str]) -> tuple[list[bool], list[bool]]:
    """Step 1: per node, whether it computes on graph-input data (other than through Shape/Size),
    and whether that data comes from fp32 inputs only."""
    src_data = {i.name: True for i in g.input}  # tensor -> depends on graph-input data
    src_fp32_only = {i.name: i.name in fp32_io for i in g.input}
    data, fp32_only = [], []
    for n in nodes:
        ins = [x for x in n.input if x in src_data]
        d = n.op_type not in _SHAPE_OPS and any(src_data[x] for x in ins)
        f = d and all(src_fp32_only[x] for x in ins if src_data[x])
        data.append(d)
        fp32_only.append(f)
        for o in n.output:
            src_data[o], src_fp32_only[o] = d, f
    return data, fp32_only


def _retype_inputs(g: onnx.GraphProto, fp32_io: frozenset[str], types: dict[str, int]) -> dict[str, int]:
    """Step 2: float graph inputs become fp16 unless kept fp32. Returns each tensor's type in the
    converted graph so far (the later steps keep it up to date)."""
    cur = dict(types)
    for vi in g.input:
        tt = vi.type.tensor_type
        if tt.elem_type == FLOAT and vi.name not in fp32_io:
            tt.elem_type = FLOAT16
            cur[vi.name] = FLOAT16
    return cur


def _plan(nodes: list[onnx.NodeProto], data: list[bool], keep: set[int], types: dict[str, int],
          cur: dict[str, int]) -> dict[int, tuple[int, list[int]]]:
    """Step 3: node -> (its precision, the float data input slots it reads), for compute nodes."""
    plan: dict[int, tuple[int, list[int]]] = {}
    for i, n in enumerate(nodes):
        if not data[i] or n.op_type in _TYPED_BY_ATTR:
            continue
        slots = _DATA_INPUTS.get(n.op_type, range(len(n.input)))
        float_in = [k for k in slots if k < len(n.input) and n.input[k] and cur.get(n.input[k]) in (FLOAT, FLOAT16)]
        if float_in or n.op_type == "Cast" or any(types.get(o) == FLOAT for o in n.output):
            plan[i] = (FLOAT if i in keep else FLOAT16, float_in)
    return plan


def _fp16_in_place(nodes: list[onnx.NodeProto], plan: dict[int, tuple[int, list[int]]],
                   init: dict[str, onnx.TensorProto]) -> set[str]:
    """Step 3 too: the fp32 initializers read only as fp16 data, converted under their own name
    (no fp32 copy kept)."""
    wants: dict[str, set[int]] = {}
    for i, n in enumerate(nodes):
        prec, float_in = plan.get(i, (FLOAT, []))
        for k, x in enumerate(n.input):
            if x in init:
                wants.setdefault(x, set()).add(prec if k in float_in else init[x].data_type)
    return {name for name, w in wants.items() if w == {FLOAT16} and init[name].data_type == FLOAT}


class _Boundaries:
    """Step 4's conversions at precision boundaries: each (tensor, type) converted once, a constant
    ahead of time (a converted copy), anything else by a ``Cast`` node appended to ``nodes``."""

    def __init__(self, constants: dict[str, onnx.TensorProto], cur: dict[str, int], report: Fp16Report,
                 nodes: list[onnx.NodeProto]):
        self.constants, self.cur, self.report, self.nodes = constants, cur, report, nodes
        self.inits: list[onnx.TensorProto] = []
        self._done: dict[tuple[str, int], str] = {}

    def as_type(self, name: str, to: int) -> str:
        """The name of ``name`` converted to ``to``."""
        key = (name, to)
        if key in self._done:
            return self._done[key]
        suffix = "fp16" if to == FLOAT16 else "fp32"
        src = self.constants.get(name)
        if src is not None:  # a constant read in both precisions: a converted copy
            arr = numpy_helper.to_array(src)
            arr = _to_fp16(arr, self.report) if to == FLOAT16 else arr.astype(np.float32)
            self.inits.append(numpy_helper.from_array(arr, f"{name}__{suffix}"))
            self.report.constants_converted += 1
        else:
            self.nodes.append(helper.make_node("Cast", [name], [f"{name}__{suffix}"], to=to, name=f"{name}__cast_{suffix}"))
            self.report.casts_added += 1
        out = f"{name}__{suffix}"
        self._done[key] = out
        self.cur[out] = to
        return out


def _convert_nodes(nodes: list[onnx.NodeProto], plan: dict[int, tuple[int, list[int]]], types: dict[str, int],
                   cur: dict[str, int], constants: dict[str, onnx.TensorProto],
                   report: Fp16Report) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Step 4: walk the nodes in order, converting at precision boundaries. Returns the new node
    list (conversions before their readers) and the converted constants."""
    out: list[onnx.NodeProto] = []
    boundaries = _Boundaries(constants, cur, report, out)
    for i, n in enumerate(nodes):
        if i in plan:
            prec, float_in = plan[i]
            _count(report, n.op_type, prec)
            _retype_node(n, prec, float_in, types, cur, boundaries)
        out.append(n)
    return out, boundaries.inits


def _count(report: Fp16Report, op_type: str, prec: int) -> None:
    if prec == FLOAT:
        report.nodes_fp32 += 1
        report.fp32_op_types[op_type] = report.fp32_op_types.get(op_type, 0) + 1
    else:
        report.nodes_fp16 += 1


def _retype_node(n: onnx.NodeProto, prec: int, float_in: list[int], types: dict[str, int], cur: dict[str, int],
                 boundaries: _Boundaries) -> None:
    """Make ``n`` compute at ``prec``: a float Cast casts to it, other nodes get their inputs converted."""
    if n.op_type == "Cast":
        to = next(a for a in n.attribute if a.name == "to")
        if to.i in (FLOAT, FLOAT16):
            to.i = prec
            for o in n.output:
                cur[o] = prec
        return
    for k in float_in:
        if cur[n.input[k]] != prec:
            n.input[k] = boundaries.as_type(n.input[k], prec)
    for o in n.output:
        if types.get(o) == FLOAT:
            cur[o] = prec


def _retype_outputs(g: onnx.GraphProto, fp32_io: frozenset[str], cur: dict[str, int], nodes: list[onnx.NodeProto],
                    report: Fp16Report) -> list[onnx.NodeProto]:
    """Step 5: float graph outputs take their declared type. Where the producer's precision differs,
    ``nodes`` now write ``<name>__inner``; returns the Casts from there to the output."""
    renames: dict[str, str] = {}
    tail: list[onnx.NodeProto] = []
    for vi in g.output:
        tt = vi.type.tensor_type
        if tt.elem_type != FLOAT:
            continue
        want = FLOAT if vi.name in fp32_io else FLOAT16
        tt.elem_type = want
        if cur.get(vi.name) != want:
            inner = f"{vi.name}__inner"
            renames[vi.name] = inner
            tail.append(helper.make_node("Cast", [inner], [vi.name], to=want, name=f"{vi.name}__cast_out"))
            report.casts_added += 1
    for n in nodes if renames else ():
        for k, x in enumerate(n.input):
            if x in renames:
                n.input[k] = renames[x]
        for k, x in enumerate(n.output):
            if x in renames:
                n.output[k] = renames[x]
    return tail


def _assemble(model: onnx.ModelProto, nodes: list[onnx.NodeProto], new_inits: list[onnx.TensorProto],
              in_place: set[str], report: Fp16Report) -> onnx.ModelProto:
    """The converted model as a new message (see ``rebuild``); unused nodes and constants left out."""
    needed = _needed(nodes, {o.name for o in model.graph.output})
    live = [n for n in nodes if any(o in needed for o in n.output)]
    return rebuild(model, live, _initializers(model.graph.initializer, new_inits, in_place, needed, report))


def _initializers(old: Iterable[onnx.TensorProto], new: list[onnx.TensorProto], in_place: set[str],
                  needed: set[str], report: Fp16Report) -> Iterator[onnx.TensorProto]:
    """The needed initializers, those converted in place as fp16, then the converted copies."""
    for t in old:
        if t.name not in needed:
            continue
        if t.name in in_place:
            yield numpy_helper.from_array(_to_fp16(numpy_helper.to_array(t), report), t.name)
        else:
            yield t
    yield from (t for t in new if t.name in needed)


def emulate_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """An fp32 twin of an fp16 graph that rounds every fp16 tensor to fp16 where it is produced.

    onnxruntime's CPU provider has no fp16 kernel for most ops (Mul, Pow, Conv, ...): it computes
    them in fp32 and drops the casts between neighbours, so an fp16 overflow inside a chain of
    such ops never shows. This twin computes every op in fp32 and stores every tensor the fp16
    graph types as fp16 through an explicit Cast(fp16)->Cast(fp32) pair, which onnxruntime
    keeps: what a strongly typed fp16 engine (TensorRT) stores, with fp32 accumulation inside ops.
    Feed it fp32 arrays holding fp16 values; its outputs are fp32 holding fp16 values.
    """
    types = _elem_types(infer_shapes(model))
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
        infer_shapes(model, strict=True)
    except onnx.shape_inference.InferenceError as e:
        raise ValueError(f"fp16 conversion produced an ill-typed graph: {e}") from None


def io_dtypes(model: onnx.ModelProto) -> dict[str, str]:
    """numpy dtype names of the graph's declared inputs and outputs."""
    out = {}
    for vi in (*model.graph.input, *model.graph.output):
        out[vi.name] = np.dtype(helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)).name
    return out
