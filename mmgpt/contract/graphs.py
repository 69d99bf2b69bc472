"""The exported graphs, each tensor declared once: name, dtype and dims.

A dim is a symbol (dynamic: batch, one length per context modality, prompt_len, cache_len, or a sum of them) or a
model constant. Everything that needs a graph's shapes derives from these declarations: torch.export's dynamic
dims, the check of the saved ONNX file, the TensorRT optimization profiles, and the backends' inputs and buffers.

  prefill             every context modality's inputs, in context order: a continuous one's `<m>_features`
                      (B, P_m, F_m), a discrete one's `<m>_ids` (B, T_m) right-padded and `<m>_lengths` (B,);
                      then the decoded modality's prompt: input_ids (B, T) right-padded, input_lengths (B,)
                      -> logits (B, V_decoded) at each row's last real token, present.{i}.key/value
                      (B, H_kv, sum P_m + T, D), each row's real positions first
  decode              input_ids (B, 1) of the decoded modality, position_ids (B, 1), past_key_values.{i}.key/value
                      (B, H_kv, S, D) -> logits (B, V_decoded), present.{i}.key/value (B, H_kv, 1, D): the NEW slot only
  context_generation  both flows' inputs, for one engine with two optimization profiles: the context profile
                      sets S = 0, the generation profile every context length to 0 and T = 1.

Names follow Hugging Face optimum, with one difference in meaning: optimum's `present` is past + new, mmgpt's
decode `present` is the new slot alone, which the runtime writes into its fixed-capacity cache at `position_ids`
(returning the whole cache would copy it every step). H_kv is the model's key/value head count (n_kv_head: fewer
than the query heads under grouped-query attention).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from mmgpt.model import GPTConfig, Modality

BATCH, PROMPT, CACHE = "batch", "prompt_len", "cache_len"
MODEL_DTYPE = "model"  # the export dtype (float32 / float16 / bfloat16)

Dim = str | int


def length_symbol(modality: str) -> str:
    """The dynamic length of a context modality's segment."""
    return f"{modality}_len"


@dataclass(frozen=True)
class ModelDims:
    """The model dimensions every stage after training needs."""
    n_layer: int
    n_kv_head: int  # the KV cache's heads
    head_dim: int
    block_size: int
    context: tuple[Modality, ...]  # the context's modalities, in sequence order
    decoded: Modality  # the generated modality: its vocabulary is the logits'

    @classmethod
    def of(cls, config: GPTConfig) -> "ModelDims":
        return cls(config.n_layer, config.n_kv_head, config.n_embd // config.n_head, config.block_size,
                   tuple(config.context_modalities), config.decoded_modality)

    @property
    def vocab_size(self) -> int:
        """Of the decoded modality."""
        return self.decoded.vocab_size

    @property
    def context_symbols(self) -> list[str]:
        return [length_symbol(m.name) for m in self.context]


def context_inputs(m: Modality) -> tuple["TensorDecl", ...]:
    """A context modality's graph inputs: features, or ids and lengths."""
    length = length_symbol(m.name)
    if m.kind == "continuous":
        return (TensorDecl(f"{m.name}_features", (BATCH, length, m.dim), MODEL_DTYPE),)
    return (TensorDecl(f"{m.name}_ids", (BATCH, length), "int64"), TensorDecl(f"{m.name}_lengths", (BATCH,), "int64"))


@dataclass(frozen=True)
class TensorDecl:
    name: str
    dims: tuple[Dim, ...]
    dtype: str  # MODEL_DTYPE or "int64"

    def shape(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
        """Concrete shape for the given symbol sizes."""
        return tuple(d if isinstance(d, int) else sum(sizes[s.strip()] for s in d.split("+")) for d in self.dims)

    def dtype_name(self, model_dtype: str) -> str:
        return model_dtype if self.dtype == MODEL_DTYPE else self.dtype


@dataclass(frozen=True)
class GraphDecl:
    name: str
    inputs: tuple[TensorDecl, ...]
    outputs: tuple[TensorDecl, ...]
    min_sizes: Mapping[str, int]  # smallest legal size of each symbol in this graph (0 where a flow has none)

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def symbols(self) -> list[str]:
        """The input symbols, in first-use order (outputs only combine them)."""
        return list(dict.fromkeys(d for t in self.inputs for d in t.dims if isinstance(d, str)))

    def io(self, model_dtype: str) -> dict:
        """The I/O contract as written into model.json: name -> dtype and dims."""
        def describe(ts):
            return {t.name: {"dtype": t.dtype_name(model_dtype), "shape": list(t.dims)} for t in ts}
        return {"inputs": describe(self.inputs), "outputs": describe(self.outputs)}


def past_names(n_layer: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]


def present_names(n_layer: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]


def interleave(keys, values) -> list:
    """[k0, v0, k1, v1, ...]: the order of the present.* outputs and past_key_values.* inputs."""
    return [t for kv in zip(keys, values) for t in kv]


def declare_graphs(dims: ModelDims) -> dict[str, GraphDecl]:
    L, H, D, V = dims.n_layer, dims.n_kv_head, dims.head_dim, dims.vocab_size
    context = tuple(t for m in dims.context for t in context_inputs(m))
    prompt = TensorDecl("input_ids", (BATCH, PROMPT), "int64")
    lengths = TensorDecl("input_lengths", (BATCH,), "int64")
    token = TensorDecl("input_ids", (BATCH, 1), "int64")
    positions = TensorDecl("position_ids", (BATCH, 1), "int64")
    past = tuple(TensorDecl(n, (BATCH, H, CACHE, D), MODEL_DTYPE) for n in past_names(L))
    logits = TensorDecl("logits", (BATCH, V), MODEL_DTYPE)
    sequence = " + ".join([*dims.context_symbols, PROMPT])
    no_context = {s: 0 for s in dims.context_symbols}

    def present(length):
        return tuple(TensorDecl(n, (BATCH, H, length, D), MODEL_DTYPE) for n in present_names(L))

    graphs = (
        GraphDecl("prefill", (*context, prompt, lengths), (logits, *present(sequence)),
                  {BATCH: 1, **no_context, PROMPT: 1}),
        GraphDecl("decode", (token, positions, *past), (logits, *present(1)), {BATCH: 1, CACHE: 1}),
        GraphDecl("context_generation", (*context, prompt, lengths, positions, *past), (logits, *present(sequence)),
                  {BATCH: 1, **no_context, PROMPT: 1, CACHE: 0}),
    )
    return {g.name: g for g in graphs}


def context_feed(dims: ModelDims, context: dict) -> dict:
    """A context dict (modality -> features, or (ids, lengths)) as graph inputs by name."""
    feed = {}
    for m, decls in ((m, context_inputs(m)) for m in dims.context):
        value = context[m.name]
        feed.update(zip((t.name for t in decls), (value,) if m.kind == "continuous" else value))
    return feed


def context_of(dims: ModelDims, named: dict) -> dict:
    """Graph inputs by name -> the context dict `MultimodalGPT.forward_cached` takes."""
    return {m.name: named[decls[0].name] if m.kind == "continuous" else tuple(named[t.name] for t in decls)
            for m, decls in ((m, context_inputs(m)) for m in dims.context)}
