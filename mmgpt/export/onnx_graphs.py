"""PyTorch -> ONNX: the graph modules, traced with torch.export (dynamic dims symbolic), cleaned with
onnx-graphsurgeon, checked against their declarations, and saved with the weights of every graph stored once, in
one external-data file shared by all of them."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
from onnx import numpy_helper
from torch.export import Dim

from mmgpt.errors import UserError
from mmgpt.contract.graphs import BATCH, CACHE, MODEL_DTYPE, PROMPT, GraphDecl, ModelDims, context_of, interleave, \
    length_symbol, past_names
from mmgpt.contract.manifest import Limits
from mmgpt.contract.weights import append_aligned, content_key
from mmgpt.model import MultimodalGPT

OPSET = 18  # pinned: LayerNormalization (17) and the Split / Reduce forms TensorRT 10 parses
WEIGHTS_FILE = "weights.bin"
_EXTERNAL_MIN_BYTES = 1024  # smaller tensors stay inline, as onnx's own convert_model_to_external_data does


class ExportError(UserError, RuntimeError):
    """The export cannot go on (a graph that does not match its declaration, failed parity, bad weights)."""


def trace_sizes(dims: ModelDims) -> dict[str, int]:
    """Example sizes for tracing: all >= 2 and pairwise different, so no dim is specialised or unified with
    another."""
    fixed = {BATCH: 2, PROMPT: 5, CACHE: 7}
    free = (n for n in range(3, 100) if n not in fixed.values())
    return {**fixed, **{s: next(free) for s in dims.context_symbols}}


# ------------------------------------------------------------------ the graphs as modules
class GraphModule(torch.nn.Module):
    """One declared graph over `MultimodalGPT.forward_cached`, the function the PyTorch backend runs: the graphs
    cannot drift. Inputs arrive in the declaration's order; a graph with a past reads positions from
    position_ids, one without starts at 0; a graph without the prompt's lengths decodes one token per row."""

    def __init__(self, model: MultimodalGPT, graph: GraphDecl):
        super().__init__()
        self.model, self.graph, self.dims = model, graph, ModelDims.of(model.config)

    def forward(self, *inputs):
        x = dict(zip(self.graph.input_names, inputs, strict=True))
        ids = x["input_ids"]
        lengths = x.get("input_lengths", torch.ones_like(ids[:, 0]))
        start = x["position_ids"][:, 0] if "position_ids" in x else torch.zeros_like(lengths)
        names = past_names(self.dims.n_layer)
        past = [x[n] for n in names] if names[0] in x else None
        context = context_of(self.dims, x) if "input_lengths" in x else None
        logits, k, v = self.model.forward_cached(context, ids, lengths, start, past and past[0::2],
                                                 past and past[1::2])
        return (logits, *interleave(k, v))


def sample_inputs(graph: GraphDecl, dims: ModelDims, dtype: torch.dtype) -> tuple:
    """Tracing inputs at trace_sizes: random floats, ids in their modality's vocabulary, valid lengths and
    positions."""
    g = torch.Generator().manual_seed(0)
    sizes = trace_sizes(dims)
    B, S = sizes[BATCH], sizes[CACHE]
    vocab = {"input_ids": dims.vocab_size, **{f"{m.name}_ids": m.vocab_size for m in dims.context
                                             if m.kind == "discrete"}}
    special = {"input_lengths": torch.tensor([sizes[PROMPT], 2]), "position_ids": torch.tensor([[4], [S - 1]]),
               **{f"{m.name}_lengths": torch.tensor([sizes[length_symbol(m.name)], 1]) for m in dims.context}}
    out = []
    for t in graph.inputs:
        shape = t.shape(sizes)
        if t.name in special:
            out.append(special[t.name][:B])
        elif t.dtype == MODEL_DTYPE:
            out.append(torch.randn(shape, generator=g).to(dtype))
        else:
            out.append(torch.randint(0, vocab[t.name], shape, generator=g))
    return tuple(out)


def dynamic_shapes(graph: GraphDecl, dims: ModelDims, limits: Limits) -> tuple:
    """torch.export's dynamic_shapes: every input arrives in forward's one *inputs tuple."""
    top = limits.by_symbol(dims)
    sym = {s: Dim(s, min=graph.min_sizes[s], max=top[s]) for s in graph.symbols}
    return (tuple({axis: sym[d] for axis, d in enumerate(t.dims) if isinstance(d, str)} or None
                  for t in graph.inputs),)


class _OptionalOperatorFilter(logging.Filter):
    """torch.onnx announces, once per operator, that torchvision's operators are skipped when torchvision is not
    installed; mmgpt's graphs use none of them, so the lines say nothing a user could act on."""

    def filter(self, record):
        return "torchvision is not installed" not in record.getMessage()


def trace(model: MultimodalGPT, graph: GraphDecl, dtype: torch.dtype, limits: Limits) -> onnx.ModelProto:
    """torch.export -> ONNX ModelProto with weights inline (they are moved out later, shared)."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    if not any(isinstance(f, _OptionalOperatorFilter) for f in registration.filters):
        registration.addFilter(_OptionalOperatorFilter())
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        for noisy in ("torch.onnx", "onnx_ir", "onnxscript"):  # their INFO lines drown the export summary
            logging.getLogger(noisy).setLevel(logging.WARNING)
        dims = ModelDims.of(model.config)
        program = torch.onnx.export(GraphModule(model, graph).eval(), sample_inputs(graph, dims, dtype),
                                    dynamo=True, opset_version=OPSET, input_names=graph.input_names,
                                    output_names=graph.output_names,
                                    dynamic_shapes=dynamic_shapes(graph, dims, limits),
                                    external_data=False, verbose=False)
    return program.model_proto


# ------------------------------------------------------------------ graphsurgeon cleanup
def cleanup(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """Fold constants, drop dead nodes, toposort; fix what TensorRT's parser rejects. Returns the stats."""
    graph = gs.import_onnx(model)
    before = len(graph.nodes)
    graph.fold_constants().cleanup().toposort()
    fixed_zero = _fix_zero_volume_constants(graph)
    fixed_dtype = _match_constant_dtypes(graph)
    graph.cleanup().toposort()
    out = gs.export_onnx(graph)
    out.opset_import[0].version = model.opset_import[0].version if out.opset_import else OPSET
    out.ir_version = model.ir_version
    return out, {"nodes_before": before, "nodes_after": len(graph.nodes), "zero_volume_fixed": fixed_zero,
                 "constants_cast": fixed_dtype}


def _fix_zero_volume_constants(graph: gs.Graph) -> int:
    """TensorRT rejects empty initializers; an empty constant feeding a Concat contributes nothing: drop it."""
    fixed = 0
    for node in graph.nodes:
        if node.op != "Concat":
            continue
        keep = [t for t in node.inputs if not (isinstance(t, gs.Constant) and t.values.size == 0)]
        if len(keep) < len(node.inputs) and keep:
            fixed += len(node.inputs) - len(keep)
            node.inputs[:] = keep
    return fixed


_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Where", "Max", "Min"}


def _match_constant_dtypes(graph: gs.Graph) -> int:
    """In an fp16 graph, an fp32 constant feeding an elementwise op with fp16 inputs makes a strongly typed network
    fail: cast the constant to fp16. (graphsurgeon holds constants as NumPy arrays, which have no bfloat16.)"""
    fixed = 0
    for node in graph.nodes:
        if node.op not in _ELEMENTWISE:
            continue
        if not any(isinstance(t, gs.Variable) and t.dtype is not None and np.dtype(t.dtype) == np.float16
                   for t in node.inputs):
            continue
        for t in node.inputs:
            if isinstance(t, gs.Constant) and t.values.dtype == np.float32:
                t.values = t.values.astype(np.float16)
                fixed += 1
    return fixed


# ------------------------------------------------------------------ shared external weights
def save_with_shared_weights(models: dict[str, onnx.ModelProto], out_dir: Path, blob,
                             offsets: dict[bytes, int]) -> dict:
    """Write each model as out_dir/<name>.onnx; large tensors go into the open weights file `blob`, each distinct
    tensor once (same bytes -> same offset, recorded in `offsets`), so all graphs share one copy on disk."""
    stored = referenced = 0
    for name, model in models.items():
        for tensor in _all_tensors(model.graph):
            if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.raw_data) < _EXTERNAL_MIN_BYTES:
                continue
            data = tensor.raw_data
            key = content_key(data)
            if key not in offsets:
                offsets[key] = append_aligned(blob, data)
                stored += len(data)
            referenced += len(data)
            offset, length = offsets[key], len(data)
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
            del tensor.external_data[:]
            for k, v in (("location", WEIGHTS_FILE), ("offset", str(offset)), ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = k, v
        onnx.save_model(model, out_dir / f"{name}.onnx")
    sizes = {f"{n}.onnx": (out_dir / f"{n}.onnx").stat().st_size for n in models}
    return {"weights_file": WEIGHTS_FILE, "weights_bytes": stored, "bytes_if_not_shared": referenced, **sizes}


def _all_tensors(graph: onnx.GraphProto):
    """Initializers and Constant-node tensors, subgraphs included, all with raw_data."""
    for t in graph.initializer:
        _to_raw(t)
        yield t
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                _to_raw(attr.t)
                yield attr.t
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_tensors(attr.g)


def _to_raw(t: onnx.TensorProto) -> None:
    if t.data_location != onnx.TensorProto.EXTERNAL and not t.HasField("raw_data"):
        arr = numpy_helper.to_array(t)
        t.CopyFrom(numpy_helper.from_array(arr, t.name))


# ------------------------------------------------------------------ contract checks
def io_dims(model: onnx.ModelProto) -> dict[str, list]:
    """name -> dims as saved: a str for a symbolic dim, an int for a fixed one."""
    def dims(vi):
        return [d.dim_param if d.dim_param else d.dim_value for d in vi.type.tensor_type.shape.dim]
    return {vi.name: dims(vi) for vi in list(model.graph.input) + list(model.graph.output)}


_ONNX_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
                onnx.TensorProto.BFLOAT16: "bfloat16", onnx.TensorProto.INT64: "int64"}


def check_against_declaration(model: onnx.ModelProto, graph: GraphDecl, model_dtype: str) -> None:
    """The saved graph has the declared names in order, dtypes, and ranks; every declared symbolic dim stayed
    symbolic (was not specialised to the tracing size) and every constant dim has its value."""
    order = [vi.name for vi in model.graph.input], [vi.name for vi in model.graph.output]
    if order != (graph.input_names, graph.output_names):
        raise ExportError(f"{graph.name}: I/O names {order} differ from the declaration "
                          f"{(graph.input_names, graph.output_names)}")
    saved = io_dims(model)
    dtypes = {vi.name: _ONNX_DTYPES.get(vi.type.tensor_type.elem_type, str(vi.type.tensor_type.elem_type))
              for vi in list(model.graph.input) + list(model.graph.output)}
    for t in (*graph.inputs, *graph.outputs):
        got = saved[t.name]
        if dtypes[t.name] != t.dtype_name(model_dtype):
            raise ExportError(f"{graph.name}: {t.name} is {dtypes[t.name]}, declared {t.dtype_name(model_dtype)}")
        if len(got) != len(t.dims):
            raise ExportError(f"{graph.name}: {t.name} has rank {len(got)}, declared dims {list(t.dims)}")
        for g, w in zip(got, t.dims):
            if isinstance(w, str) and not isinstance(g, str):
                raise ExportError(f"{graph.name}: {t.name} dims {got}: '{w}' was specialised to {g} during tracing")
            if isinstance(w, int) and g != w:
                raise ExportError(f"{graph.name}: {t.name} dims {got}, declared {list(t.dims)}")
