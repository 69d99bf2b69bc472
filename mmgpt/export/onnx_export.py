"""PyTorch -> ONNX: trace with torch.export (dynamic dims symbolic), clean with onnx-graphsurgeon, and store the
weights of every graph once, in one external-data file shared by all of them."""
from __future__ import annotations

import hashlib
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
from onnx import numpy_helper

from mmgpt.export.graphs import GraphSpec

OPSET = 18  # pinned: LayerNormalization (17) and the Split / Reduce forms TensorRT 10 parses
WEIGHTS_FILE = "weights.bin"
_EXTERNAL_MIN_BYTES = 1024  # smaller tensors stay inline, as onnx's own convert_model_to_external_data does


class ExportError(RuntimeError):
    pass


def trace(spec: GraphSpec) -> onnx.ModelProto:
    """torch.export -> ONNX ModelProto with weights inline (they are moved out later, shared)."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        for noisy in ("torch.onnx", "onnx_ir", "onnxscript"):  # their INFO lines drown the export summary
            logging.getLogger(noisy).setLevel(logging.WARNING)
        program = torch.onnx.export(spec.module, spec.sample_inputs, dynamo=True, opset_version=OPSET,
                                    input_names=spec.input_names, output_names=spec.output_names,
                                    dynamic_shapes=_by_position(spec), external_data=False, verbose=False)
    return program.model_proto


def _by_position(spec: GraphSpec):
    """torch.export wants dynamic_shapes keyed like forward's signature; *past arrives as one tuple argument."""
    names = spec.input_names
    fixed = [n for n in names if not n.startswith("past_key_values.")]
    past = [n for n in names if n.startswith("past_key_values.")]
    shapes = [spec.dynamic_shapes.get(n) for n in fixed]
    if past:
        shapes.append(tuple(spec.dynamic_shapes[n] for n in past))
    return tuple(shapes)


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
def save_with_shared_weights(models: dict[str, onnx.ModelProto], out_dir: Path) -> dict:
    """Write each model as out_dir/<name>.onnx; large tensors go to one WEIGHTS_FILE, each distinct tensor once
    (same bytes -> same offset), so prefill and decode share one copy of the weights on disk."""
    offsets: dict[str, tuple[int, int]] = {}
    stored = referenced = 0
    with open(out_dir / WEIGHTS_FILE, "wb") as blob:
        for name, model in models.items():
            for tensor in _all_tensors(model.graph):
                if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.raw_data) < _EXTERNAL_MIN_BYTES:
                    continue
                data = tensor.raw_data
                key = hashlib.sha1(data).hexdigest() + str(len(data))
                if key not in offsets:
                    pad = (-blob.tell()) % 64  # aligned, so readers can map tensors in place
                    blob.write(b"\0" * pad)
                    offsets[key] = (blob.tell(), len(data))
                    blob.write(data)
                    stored += len(data)
                referenced += len(data)
                offset, length = offsets[key]
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


def check_contract(model: onnx.ModelProto, spec: GraphSpec) -> None:
    """Every name in the contract exists, and every dim meant to be dynamic is symbolic (not traced to a value)."""
    saved = io_dims(model)
    order = [vi.name for vi in model.graph.input], [vi.name for vi in model.graph.output]
    if order != (spec.input_names, spec.output_names):
        raise ExportError(f"{spec.name}: I/O names {order} differ from the contract "
                          f"{(spec.input_names, spec.output_names)}")
    for name, want in spec.contract.items():
        got = saved[name]
        if len(got) != len(want):
            raise ExportError(f"{spec.name}: {name} has rank {len(got)}, contract says {want}")
        for g, w in zip(got, want):
            if isinstance(w, str) and not isinstance(g, str):
                raise ExportError(f"{spec.name}: {name} dims {got}: '{w}' was specialised to {g} during tracing")
            if isinstance(w, int) and g != w:
                raise ExportError(f"{spec.name}: {name} dims {got}, contract says {want}")
