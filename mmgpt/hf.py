"""Hugging Face in and out: a local `save_pretrained` directory of GPT-2 or of the Llama family (LlamaForCausalLM,
Qwen2ForCausalLM; SmolLM2 is a Llama) becomes an mmgpt config + language-model weights + tokenizer, and an mmgpt
model becomes such a directory of its own family again, plus its modalities' own tables (encoders of continuous
modalities, embeddings and heads of discrete ones other than text) and their description.

GPT-2: the two models differ only in storage: transformers keeps `c_attn`, `c_proj` and `c_fc` in Conv1D layout
(in, out), mmgpt in nn.Linear layout (out, in); parameter names are otherwise GPT-2's on both sides. Llama family:
names and layouts are Hugging Face's on both sides (`model.layers.{i}.self_attn.q_proj.weight`, ...); a Qwen2 is a
Llama with q/k/v biases. Both families position every input element alike (learned table or RoPE at 0, 1, ...),
so any modality enters HF as `inputs_embeds` and reproduces mmgpt (GPT-2's names shown):

    hf = transformers.GPT2LMHeadModel.from_pretrained(d)
    tables = load_modality_tables(d)
    embeds = torch.cat([tables.embed("image", features), hf.get_input_embeddings()(input_ids)], dim=1)
    logits = hf(inputs_embeds=embeds).logits[:, features.shape[1]:]  # = mmgpt's forward({"image": ...}, ids)

Only json, safetensors and torch are needed here: transformers stays a test / serving dependency.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mmgpt.files import staging_dir
from mmgpt.model import MODALITY_TABLES, TEXT, GPTConfig, MultimodalGPT, RopeScaling
from mmgpt.tokenizer import (ByteTokenizer, HFTokenizer, TextTokenizer, as_hf_tokenizer, check_tokenizer_fits,
                             load_hf_tokenizer)
from mmgpt.errors import UserError

LLAMA_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}  # model_type -> class
SUPPORTED_MODEL_TYPES = ("gpt2", *LLAMA_ARCHITECTURES)
# config.json field -> GPTConfig field, for what maps one to one. The first five are required; the others
# default as in GPT2Config, to the same values as GPTConfig's defaults.
SAME_FIELDS = {"vocab_size": "vocab_size", "n_positions": "block_size", "n_layer": "n_layer", "n_head": "n_head",
               "n_embd": "n_embd", "layer_norm_epsilon": "layer_norm_epsilon", "tie_word_embeddings": "tie_weights"}
REQUIRED_FIELDS = ("vocab_size", "n_positions", "n_layer", "n_head", "n_embd")
# GPT2Config's activation_function -> GPTConfig.activation; the first name of each is what save_hf writes.
ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
# GPT2Config switches mmgpt's attention has no counterpart for, at the value that matches mmgpt.
FIXED_FIELDS = {
    "scale_attn_weights": (True, "mmgpt always scales attention scores by 1/sqrt(head_dim)"),
    "scale_attn_by_inverse_layer_idx": (False, "mmgpt does not scale scores by layer index"),
    "reorder_and_upcast_attn": (False, ("mmgpt computes q @ k in the model dtype before scaling, not in fp32; "
                                        "the same function, so set it to false to run the model in fp32 or bf16")),
    "add_cross_attention": (False, "mmgpt is a decoder without cross-attention"),
}
# GPTConfig fields a GPT-2 config.json says nothing about: the caller's choice.
FREE_FIELDS = ("modalities", "context", "decoded", "dropout")
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Llama / Qwen2 config.json field -> GPTConfig field, and the value transformers assumes where a field is absent
# (None: required).
LLAMA_FIELDS = {"vocab_size": ("vocab_size", None), "max_position_embeddings": ("block_size", None),
                "num_hidden_layers": ("n_layer", None), "num_attention_heads": ("n_head", None),
                "hidden_size": ("n_embd", None), "intermediate_size": ("intermediate_size", None),
                "num_key_value_heads": ("n_kv_head", "num_attention_heads"),
                "rms_norm_eps": ("layer_norm_epsilon", 1e-6), "tie_word_embeddings": ("tie_weights", False)}
# Llama-family switches mmgpt's block has no counterpart for, at the value that matches it (absent: matches).
LLAMA_FIXED_FIELDS = {
    "hidden_act": ("silu", "mmgpt's Llama MLP is SwiGLU with SiLU"),
    "attention_bias": (False, "a bias on o_proj too; mmgpt's Llama has q/k/v biases for Qwen2 only"),
    "mlp_bias": (False, "mmgpt's SwiGLU has no biases"),
    "use_sliding_window": (False, "mmgpt's attention is full, never windowed"),
    "partial_rotary_factor": (1.0, "mmgpt rotates the whole head"),
    "num_experts": (None, "mixture-of-experts MLPs are not represented"),
    "num_local_experts": (None, "mixture-of-experts MLPs are not represented"),
}
ROPE_TYPES = ("default", "llama3")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
SHARD_INDEX = "model.safetensors.index.json"
DROPPED_BUFFERS = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")  # buffers older versions saved
TABLES_WEIGHTS, TABLES_SPEC = "modalities.safetensors", "modalities.json"


class HFFormatError(UserError):
    """A Hugging Face directory mmgpt cannot load or represent; the message names the file or field."""


class HFLanguageModel(NamedTuple):
    config: GPTConfig
    state_dict: dict[str, torch.Tensor]  # mmgpt names and layout, without the modalities' own tables
    tokenizer: HFTokenizer


# ---------------------------------------------------------------- in
def config_from_hf(hf: dict, source: str = "config.json", **free) -> GPTConfig:
    """GPTConfig from a GPT-2, Llama or Qwen2 config.json's fields; `free` sets FREE_FIELDS. Anything mmgpt cannot
    represent is an HFFormatError naming the field."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise HFFormatError(f"{source}: model_type {model_type!r} is not supported; mmgpt loads "
                            f"{', '.join(SUPPORTED_MODEL_TYPES)} (a GPT-2 or Llama-family decoder)")
    wrong = set(free) - set(FREE_FIELDS)
    if wrong:
        raise HFFormatError(f"{sorted(wrong)} cannot be set: with a Hugging Face directory, {source} determines "
                            f"every model config field except {', '.join(FREE_FIELDS)}")
    if model_type in LLAMA_ARCHITECTURES:
        return _llama_config_from_hf(hf, source, **free)
    for field, (value, why) in FIXED_FIELDS.items():
        if hf.get(field, value) != value:
            raise HFFormatError(f"{source}: {field}={hf[field]!r} is not supported ({why}); mmgpt needs {value!r}")
    for field in REQUIRED_FIELDS:
        value = hf.get(field)
        if type(value) is not int or value < 1:
            raise HFFormatError(f"{source}: {field} is {repr(value) if field in hf else 'missing'}; a GPT-2 "
                                f"config.json has positive integers {', '.join(REQUIRED_FIELDS)}")
    if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        raise HFFormatError(f"{source}: n_inner={hf['n_inner']} is not supported; mmgpt's MLP width is "
                            f"4 * n_embd = {4 * hf['n_embd']} (n_inner null)")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in ACTIVATIONS:
        raise HFFormatError(f"{source}: activation_function={activation!r} is not supported; choose one of "
                            f"{', '.join(ACTIVATIONS)}")
    mapped = {ours: hf[theirs] for theirs, ours in SAME_FIELDS.items() if theirs in hf}
    try:
        return GPTConfig(**mapped, activation=ACTIVATIONS[activation], bias=True, **free)
    except (TypeError, ValueError) as e:
        raise HFFormatError(f"{source}: {e}") from None


def _rope_from_hf(hf: dict, source: str) -> dict:
    """rope_theta and rope_scaling from either form: transformers 5's `rope_parameters`, or the `rope_theta` +
    `rope_scaling` that hub files carry."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise HFFormatError(f"{source}: rope_parameters / rope_scaling must be an object, got {params!r}")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise HFFormatError(f"{source}: RoPE type {kind!r} is not supported; mmgpt applies "
                            f"{' or '.join(ROPE_TYPES)} RoPE")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise HFFormatError(f"{source}: partial_rotary_factor={params['partial_rotary_factor']} is not supported; "
                            "mmgpt rotates the whole head")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    if kind == "default":
        return {"rope_theta": float(theta), "rope_scaling": None}
    scaling = {k: v for k, v in params.items() if k not in ("rope_type", "type", "rope_theta", "partial_rotary_factor")}
    try:
        return {"rope_theta": float(theta), "rope_scaling": RopeScaling.from_dict(scaling)}
    except (UserError, TypeError) as e:
        raise HFFormatError(f"{source}: llama3 RoPE scaling: {e}") from None


def _llama_config_from_hf(hf: dict, source: str, **free) -> GPTConfig:
    for field, (value, why) in LLAMA_FIXED_FIELDS.items():
        if hf.get(field, value) != value:
            raise HFFormatError(f"{source}: {field}={hf[field]!r} is not supported ({why}); mmgpt needs {value!r}")
    for field, (_, default) in LLAMA_FIELDS.items():
        value = hf.get(field)
        if default is None and (type(value) is not int or value < 1):
            raise HFFormatError(f"{source}: {field} is {repr(value) if field in hf else 'missing'}; a Llama-family "
                                "config.json has positive integers " + ", ".join(
                                    f for f, (_, d) in LLAMA_FIELDS.items() if d is None))
    layer_types = set(hf.get("layer_types") or ["full_attention"])
    if layer_types != {"full_attention"}:
        raise HFFormatError(f"{source}: layer_types {sorted(layer_types)} is not supported; mmgpt's attention is "
                            "full_attention in every layer (no sliding windows)")
    head_dim = hf["hidden_size"] // hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, head_dim):
        raise HFFormatError(f"{source}: head_dim={hf['head_dim']} is not supported; mmgpt's head size is "
                            f"hidden_size / num_attention_heads = {head_dim}")
    mapped = {ours: hf.get(theirs, hf.get(default) if isinstance(default, str) else default)
              for theirs, (ours, default) in LLAMA_FIELDS.items()}
    try:
        return GPTConfig(**mapped, **_rope_from_hf(hf, source), family="llama",
                         qkv_bias=hf["model_type"] == "qwen2", **free)
    except (TypeError, ValueError) as e:
        raise HFFormatError(f"{source}: {e}") from None


def state_dict_from_hf(weights: dict[str, torch.Tensor], config: GPTConfig, source: str = "weights"):
    """mmgpt's language-model state dict from HF weights: either naming (GPT2LMHeadModel's `transformer.h.0...` or
    GPT2Model's `h.0...`; LlamaForCausalLM's `model.layers.0...` or LlamaModel's `layers.0...`), GPT-2's Conv1D
    weights transposed, buffers (causal masks, RoPE frequencies) dropped."""
    state = {}
    trunk = "transformer." if config.family == "gpt2" else "model."
    for name, t in weights.items():
        if name.endswith(DROPPED_BUFFERS):
            continue
        if not name.startswith((trunk, "lm_head.")):
            name = trunk + name
        state[name] = t.t().contiguous() if config.family == "gpt2" and name.endswith(CONV1D_WEIGHTS) else t
    if config.tie_weights:
        state.pop("lm_head.weight", None)  # a tied head is wte; some files store a copy
    with torch.device("meta"):  # names and shapes only, no memory
        expected = {k: v.shape for k, v in MultimodalGPT(config).state_dict().items()
                    if not k.startswith(MODALITY_TABLES) and not (config.tie_weights and k == "lm_head.weight")}
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise HFFormatError(f"{source}: weights do not match config.json (missing {missing[:5]}"
                            f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                            f"{' ...' if len(unexpected) > 5 else ''})")
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(s)}" for k, s in expected.items() if state[k].shape != s]
    if wrong:
        raise HFFormatError(f"{source}: tensor shapes do not match config.json: {'; '.join(wrong[:3])}")
    return state


def _read_weights(directory: Path) -> tuple[dict[str, torch.Tensor], Path]:
    if (directory / SHARD_INDEX).is_file():
        return _read_shards(directory / SHARD_INDEX), directory / SHARD_INDEX
    for fname in WEIGHT_FILES:
        path = directory / fname
        if not path.is_file():
            continue
        try:
            if fname.endswith(".safetensors"):
                return load_file(path), path
            return torch.load(path, map_location="cpu", weights_only=True), path
        except Exception as e:  # truncated file, foreign format, pickle that is not a plain state dict, ...
            raise HFFormatError(f"{path}: cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]})") \
                from None
    raise HFFormatError(f"{directory}: no {' or '.join((SHARD_INDEX, *WEIGHT_FILES))}; save the model there with "
                        "`model.save_pretrained(dir)`")


def _read_shards(index_path: Path) -> dict[str, torch.Tensor]:
    """A sharded safetensors checkpoint: the index's weight_map names the file of every tensor."""
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise HFFormatError(f"{index_path}: not a safetensors index with a weight_map ({type(e).__name__})") \
            from None
    weights = {}
    for fname in sorted(set(weight_map.values())):
        path = index_path.parent / fname
        if not path.is_file():
            raise HFFormatError(f"{index_path}: names the shard {fname}, which is missing; copy every shard")
        try:
            weights.update(load_file(path))
        except Exception as e:  # truncated file, foreign format
            raise HFFormatError(f"{path}: cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]})") \
                from None
    missing = sorted(set(weight_map) - set(weights))
    if missing:
        raise HFFormatError(f"{index_path}: the shards lack {missing[:5]}, which the index names; copy them again")
    return weights


def load_hf(directory, **free) -> HFLanguageModel:
    """A local Hugging Face GPT-2 / Llama / Qwen2 directory -> (GPTConfig, language-model state dict, tokenizer).

    `free` sets the fields config.json does not determine (modalities, context, decoded, dropout). The state dict
    has none of the modalities' own tables: they start fresh (`load_language_model`). Every check runs before any
    training can.
    """
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise HFFormatError(f"{directory}: no config.json; expected a Hugging Face GPT-2 or Llama-family directory "
                            "(config.json, model.safetensors (sharded or not) or pytorch_model.bin, tokenizer files)")
    try:
        hf = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HFFormatError(f"{config_path}: not valid JSON ({getattr(e, 'msg', e)})") from None
    if not isinstance(hf, dict):
        raise HFFormatError(f"{config_path}: must hold a JSON object (a Hugging Face config), got "
                            f"{type(hf).__name__}")
    config = config_from_hf(hf, str(config_path), **free)
    tokenizer = load_hf_tokenizer(directory)
    check_tokenizer_fits(tokenizer, config)
    weights, path = _read_weights(directory)
    return HFLanguageModel(config, state_dict_from_hf(weights, config, str(path)), tokenizer)


def load_language_model(model: MultimodalGPT, state_dict: dict[str, torch.Tensor]) -> None:
    """Load `load_hf`'s weights into a model built from its config; only the modalities' own tables keep their
    fresh initialisation."""
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if not k.startswith(MODALITY_TABLES)
               and not (k == "lm_head.weight" and model.config.tie_weights)]
    if missing or unexpected:
        raise HFFormatError(f"the language-model weights do not fit this model (missing {missing[:5]}, "
                            f"unexpected {unexpected[:5]}); build it from load_hf's config")


# ---------------------------------------------------------------- out
# Per encoder kind: the function it computes, and each tensor's name in modalities.safetensors (the function's
# symbols, after "<modality>.") -> its name in mmgpt's ModalityEncoder (indices of its nn.Sequential for "mlp").
ENCODER_FUNCTIONS = {
    "linear": "E = X W^T + b",
    "mlp": "E = gelu_tanh(LN(X) W1^T + b1) W2^T + b2, LN(X) = (X - mean(X)) / sqrt(var(X) + eps) * ln_weight "
           "+ ln_bias over the last dim (biased variance), gelu_tanh(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + "
           "0.044715 x^3)))",
}
ENCODER_TENSORS = {
    "linear": {"W": "proj.weight", "b": "proj.bias"},
    "mlp": {"ln_weight": "proj.0.weight", "ln_bias": "proj.0.bias", "W1": "proj.1.weight", "b1": "proj.1.bias",
            "W2": "proj.3.weight", "b2": "proj.3.bias"},
}
README = """# {name}: a {family} with more modalities, written by mmgpt

- config.json, model.safetensors, generation_config.json: the language model, loadable with
  `transformers.{architecture}.from_pretrained(this_dir)`; its token table and head are the `text` modality's.
- tokenizer.json, tokenizer_config.json: `transformers.AutoTokenizer.from_pretrained(this_dir)`.{byte_note}
- modalities.safetensors, modalities.json: every other modality's own tables. modalities.json lists the
  modalities, the context order ({context}) and the decoded modality ({decoded}); per modality its kind, an
  encoder's function (continuous: features X (B, P, dim) -> embeddings E (B, P, {n_embd})) or an embedding table
  and head (discrete: ids -> rows of `<name>.embedding`; logits = final hidden state @ `<name>.head`^T), and
  every tensor's shape.

mmgpt's input is the context's embeddings, then the decoded modality's, with positions 0, 1, ... over all of
them, which is exactly what transformers computes for `inputs_embeds`. With mmgpt installed:

    import torch, transformers
    from mmgpt.hf import load_modality_tables
    hf = transformers.{architecture}.from_pretrained(this_dir)
    tables = load_modality_tables(this_dir)
    wte = hf.get_input_embeddings()
    inputs = {{...}}  # per context modality: features (1, P, dim) or ids (1, n); the decoded one's prompt ids
    embeds = torch.cat([tables.embed(name, inputs[name], wte) for name in tables.context]
                       + [tables.embed(tables.decoded, inputs[tables.decoded], wte)], dim=1)
    hidden = hf.base_model(inputs_embeds=embeds).last_hidden_state  # the final norm applied
    logits = tables.logits(tables.decoded, hidden)  # a new modality's head (text: hf.lm_head(hidden))

The same embeddings serve vLLM (`prompt_embeds`) or TensorRT-LLM's prompt table.
"""
BYTE_NOTE = """
  This model was trained with mmgpt's byte-level tokenizer; it is written as an equivalent byte-level BPE with
  no merges (token id = UTF-8 byte value, specials at mmgpt's ids)."""


def hf_model_type(config: GPTConfig) -> str:
    """The transformers model_type a model is written as: a Llama with q/k/v biases is a Qwen2."""
    if config.family == "gpt2":
        return "gpt2"
    return "qwen2" if config.qkv_bias else "llama"


def hf_architecture(config: GPTConfig) -> str:
    return "GPT2LMHeadModel" if config.family == "gpt2" else LLAMA_ARCHITECTURES[hf_model_type(config)]


def hf_config(config: GPTConfig, tokenizer: HFTokenizer, dtype: torch.dtype) -> dict:
    common = {"architectures": [hf_architecture(config)], "model_type": hf_model_type(config),
              "initializer_range": 0.02, "use_cache": True, "bos_token_id": tokenizer.bos_id,
              "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id,
              "dtype": str(dtype).removeprefix("torch.")}
    if config.family != "gpt2":
        scaling = config.rope_scaling and {"rope_type": "llama3", **asdict(config.rope_scaling)}
        fixed = {field: value for field, (value, _) in LLAMA_FIXED_FIELDS.items() if value is not None}
        if hf_model_type(config) == "llama":
            fixed.pop("use_sliding_window")  # a Qwen2 field
        else:
            fixed.pop("attention_bias")  # Qwen2's q/k/v biases are implied by its type
        # rope_theta + rope_scaling as hub files carry them: read by every transformers version
        return {**common, **{theirs: getattr(config, ours) for theirs, (ours, _) in LLAMA_FIELDS.items()},
                **fixed, "rope_theta": config.rope_theta, "rope_scaling": scaling, "head_dim": config.head_dim,
                "attention_dropout": config.dropout}
    activation = next(theirs for theirs, ours in ACTIVATIONS.items() if ours == config.activation)
    return {**common, **{theirs: getattr(config, ours) for theirs, ours in SAME_FIELDS.items()},
            "n_inner": None, "activation_function": activation,
            **{field: value for field, (value, _) in FIXED_FIELDS.items()},
            "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout}


def _tables(model: MultimodalGPT) -> tuple[dict[str, torch.Tensor], dict]:
    """The modalities' own tensors under their file names, and modalities.json's description of them."""
    c, params = model.config, {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tensors, described = {}, []
    for m in c.modalities:
        entry = {"name": m.name, "kind": m.kind}
        if m.kind == "continuous":
            names = {f"{m.name}.{sym}": f"encoders.{m.name}.{name}" for sym, name in ENCODER_TENSORS[m.encoder].items()}
            entry.update(dim=m.dim, encoder=m.encoder, function=ENCODER_FUNCTIONS[m.encoder],
                         input=f"X (batch, length, {m.dim}) float", output=f"E (batch, length, {c.n_embd})")
            if m.encoder == "mlp":
                entry["eps"] = model.encoders[m.name].proj[0].eps
        elif m.name == TEXT:
            names = {}
            entry.update(vocab_size=m.vocab_size, tables="the language model's own token table and lm_head")
        else:
            names = {f"{m.name}.embedding": f"embeddings.{m.name}.weight",
                     **({f"{m.name}.head": f"heads.{m.name}.weight"} if m.head else {})}
            entry.update(vocab_size=m.vocab_size, end_id=m.end_id, head=m.head)
        tensors.update({sym: params[name].contiguous() for sym, name in names.items()})
        entry["tensors"] = {sym: list(params[name].shape) for sym, name in names.items()}
        described.append(entry)
    spec = {"format": "mmgpt-modalities", "version": 1, "n_embd": c.n_embd, "context": c.context,
            "decoded": c.decoded, "tensors_file": TABLES_WEIGHTS,
            "dtype": str(model.token_embedding.weight.dtype).removeprefix("torch."), "modalities": described}
    return tensors, spec


def save_hf(model: MultimodalGPT, tokenizer: TextTokenizer, directory) -> Path:
    """Write `model` as a transformers-loadable directory of its family (GPT-2, Llama or Qwen2) plus its modalities'
    own tables (see README in it).

    Written into a temporary sibling that replaces `directory` only when complete.
    """
    c = model.config
    if c.family == "gpt2" and not c.bias:
        raise HFFormatError("transformers' GPT-2 always has biases; a model.bias=false model has no HF equivalent")
    byte_level = isinstance(tokenizer, ByteTokenizer)
    tokenizer = as_hf_tokenizer(tokenizer)
    check_tokenizer_fits(tokenizer, c)
    params = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    dtype = model.token_embedding.weight.dtype
    conv1d = CONV1D_WEIGHTS if c.family == "gpt2" else ()
    lm = {k: (v.t() if k.endswith(conv1d) else v).contiguous() for k, v in params.items()
          if not k.startswith(MODALITY_TABLES) and not (c.tie_weights and k == "lm_head.weight")}
    tables, spec = _tables(model)
    directory = Path(directory)
    with staging_dir(directory) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config(c, tokenizer, dtype), indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id},
            indent=2) + "\n")
        save_file(lm, tmp / "model.safetensors", metadata={"format": "pt"})
        tokenizer.save_files(tmp)
        save_file(tables, tmp / TABLES_WEIGHTS, metadata={"format": "pt"})
        (tmp / TABLES_SPEC).write_text(json.dumps(spec, indent=2) + "\n")
        (tmp / "README.md").write_text(README.format(
            name=directory.name, family=hf_model_type(c), architecture=hf_architecture(c),
            context=", ".join(c.context), decoded=c.decoded, n_embd=c.n_embd,
            byte_note=BYTE_NOTE if byte_level else ""))
    return directory


@dataclass
class ModalityTables:
    """modalities.json's functions over modalities.safetensors' tensors, computed from the description alone, not
    with mmgpt's modules, as any other runtime would have to."""
    spec: dict
    tensors: dict[str, torch.Tensor]

    @property
    def context(self) -> list[str]:
        return self.spec["context"]

    @property
    def decoded(self) -> str:
        return self.spec["decoded"]

    def _modality(self, name: str) -> dict:
        found = [m for m in self.spec["modalities"] if m["name"] == name]
        if not found:
            raise HFFormatError(f"no modality {name!r}; modalities.json has "
                                f"{[m['name'] for m in self.spec['modalities']]}")
        return found[0]

    def embed(self, name: str, x: torch.Tensor, text_table: torch.nn.Module | None = None) -> torch.Tensor:
        """A modality's input -> embeddings (B, n, C): features through its encoder, ids through its table (text:
        the language model's, `text_table`)."""
        m, t = self._modality(name), self.tensors
        if m["kind"] == "discrete":
            return text_table(x) if name == TEXT else F.embedding(x, t[f"{name}.embedding"])
        x = x.to(t[f"{name}.W" if m["encoder"] == "linear" else f"{name}.W1"].dtype)
        if m["encoder"] == "linear":
            return F.linear(x, t[f"{name}.W"], t[f"{name}.b"])
        h = F.layer_norm(x, x.shape[-1:], t[f"{name}.ln_weight"], t[f"{name}.ln_bias"], m["eps"])
        return F.linear(F.gelu(F.linear(h, t[f"{name}.W1"], t[f"{name}.b1"]), approximate="tanh"),
                        t[f"{name}.W2"], t[f"{name}.b2"])

    def logits(self, name: str, hidden: torch.Tensor) -> torch.Tensor:
        """The final hidden states (after ln_f) through a non-text discrete modality's head."""
        if f"{name}.head" not in self.tensors:
            raise HFFormatError(f"modality {name!r} has no head in modalities.safetensors (text's is lm_head)")
        return F.linear(hidden, self.tensors[f"{name}.head"])


def load_modality_tables(directory, device: str | torch.device = "cpu") -> ModalityTables:
    """The modalities' own tables of a directory save_hf wrote."""
    directory = Path(directory)
    spec_path = directory / TABLES_SPEC
    if not spec_path.is_file():
        raise HFFormatError(f"{directory}: no {TABLES_SPEC}; only directories written by mmgpt's save_hf "
                            "have modality tables")
    spec = json.loads(spec_path.read_text())
    if spec.get("format") != "mmgpt-modalities":
        raise HFFormatError(f"{spec_path}: not an mmgpt modalities description (format {spec.get('format')!r})")
    return ModalityTables(spec, load_file(directory / TABLES_WEIGHTS, device=str(device)))
