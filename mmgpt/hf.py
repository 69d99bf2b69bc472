"""Hugging Face GPT-2 in and out: a local `save_pretrained` directory becomes an mmgpt config + language-model
weights + tokenizer, and an mmgpt model becomes such a directory again, plus its prefix encoder.

The two models differ only in storage: transformers' GPT-2 keeps `c_attn`, `c_proj` and `c_fc` in Conv1D layout
(in, out), mmgpt in nn.Linear layout (out, in); parameter names are otherwise GPT-2's on both sides. Both add the
learned position table to every input position, so a prefix enters HF as `inputs_embeds` and reproduces mmgpt:

    hf = transformers.GPT2LMHeadModel.from_pretrained(d)
    embeds = torch.cat([load_prefix_encoder(d)(prefix), hf.get_input_embeddings()(input_ids)], dim=1)
    logits = hf(inputs_embeds=embeds).logits[:, prefix.shape[1]:]  # = mmgpt's forward(prefix, input_ids)

Only json, safetensors and torch are needed here: transformers stays a test / serving dependency.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mmgpt.files import staging_dir
from mmgpt.model import GPTConfig, MultimodalGPT
from mmgpt.tokenizer import (ByteTokenizer, HFTokenizer, TextTokenizer, as_hf_tokenizer, check_tokenizer_fits,
                             load_hf_tokenizer)
from mmgpt.errors import UserError

SUPPORTED_MODEL_TYPES = ("gpt2",)
# config.json field -> GPTConfig field, for what maps one to one. The first five are required; the others
# default as in GPT2Config, to the same values as GPTConfig's defaults.
SAME_FIELDS = {"vocab_size": "vocab_size", "n_positions": "block_size", "n_layer": "n_layer", "n_head": "n_head",
               "n_embd": "n_embd", "layer_norm_epsilon": "layer_norm_epsilon", "tie_word_embeddings": "tie_weights"}
REQUIRED_FIELDS = ("vocab_size", "n_positions", "n_layer", "n_head", "n_embd")
# GPT2Config's activation_function -> GPTConfig.activation; the first name of each is what save_hf_gpt2 writes.
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
FREE_FIELDS = ("prefix_dim", "prefix_encoder", "dropout")
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
PREFIX_WEIGHTS, PREFIX_SPEC = "prefix_encoder.safetensors", "prefix_encoder.json"


class HFFormatError(UserError):
    """A Hugging Face directory mmgpt cannot load or represent; the message names the file or field."""


class HFGPT2(NamedTuple):
    config: GPTConfig
    state_dict: dict[str, torch.Tensor]  # mmgpt names and layout, without prefix_encoder.*
    tokenizer: HFTokenizer


# ---------------------------------------------------------------- in
def config_from_hf(hf: dict, source: str = "config.json", **free) -> GPTConfig:
    """GPTConfig from a GPT-2 config.json's fields; `free` sets FREE_FIELDS. Anything mmgpt cannot represent is
    an HFFormatError naming the field."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise HFFormatError(f"{source}: model_type {model_type!r} is not supported; mmgpt loads "
                            f"{', '.join(SUPPORTED_MODEL_TYPES)} (a GPT-2 decoder)")
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
    wrong = set(free) - set(FREE_FIELDS)
    if wrong:
        raise HFFormatError(f"{sorted(wrong)} cannot be set: with a GPT-2 directory, {source} determines every "
                            f"model config field except {', '.join(FREE_FIELDS)}")
    mapped = {ours: hf[theirs] for theirs, ours in SAME_FIELDS.items() if theirs in hf}
    try:
        return GPTConfig(**mapped, activation=ACTIVATIONS[activation], bias=True, **free)
    except (TypeError, ValueError) as e:
        raise HFFormatError(f"{source}: {e}") from None


def state_dict_from_hf(weights: dict[str, torch.Tensor], config: GPTConfig, source: str = "weights"):
    """mmgpt's language-model state dict from HF GPT-2 weights: either naming (GPT2LMHeadModel's
    `transformer.h.0...` or GPT2Model's `h.0...`), Conv1D weights transposed, causal-mask buffers dropped."""
    state = {}
    for name, t in weights.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers older versions saved
            continue
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name
        state[name] = t.t().contiguous() if name.endswith(CONV1D_WEIGHTS) else t
    if config.tie_weights:
        state.pop("lm_head.weight", None)  # a tied head is wte; some files store a copy
    with torch.device("meta"):  # names and shapes only, no memory
        expected = {k: v.shape for k, v in MultimodalGPT(config).state_dict().items()
                    if not k.startswith("prefix_encoder.") and not (config.tie_weights and k == "lm_head.weight")}
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
    raise HFFormatError(f"{directory}: no {' or '.join(WEIGHT_FILES)}; save the model there with "
                        "`model.save_pretrained(dir)` (sharded checkpoints are not supported)")


def load_hf_gpt2(directory, **free) -> HFGPT2:
    """A local Hugging Face GPT-2 directory -> (GPTConfig, language-model state dict, tokenizer).

    `free` sets the fields config.json does not determine (prefix_dim, prefix_encoder, dropout). The state dict
    has no prefix encoder: it starts fresh (`load_language_model`). Every check runs before any training can.
    """
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise HFFormatError(f"{directory}: no config.json; expected a Hugging Face GPT-2 directory "
                            "(config.json, model.safetensors or pytorch_model.bin, tokenizer files)")
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
    return HFGPT2(config, state_dict_from_hf(weights, config, str(path)), tokenizer)


def load_language_model(model: MultimodalGPT, state_dict: dict[str, torch.Tensor]) -> None:
    """Load `load_hf_gpt2`'s weights into a model built from its config; only the prefix encoder keeps its
    fresh initialisation."""
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if not k.startswith("prefix_encoder.")
               and not (k == "lm_head.weight" and model.config.tie_weights)]
    if missing or unexpected:
        raise HFFormatError(f"the language-model weights do not fit this model (missing {missing[:5]}, "
                            f"unexpected {unexpected[:5]}); build it from load_hf_gpt2's config")


# ---------------------------------------------------------------- out
# Per prefix-encoder kind: the function it computes, and each tensor's name in prefix_encoder.safetensors
# (the function's symbols) -> its name in mmgpt's PrefixEncoder (indices of its nn.Sequential for "mlp").
PREFIX_FUNCTIONS = {
    "linear": "E = X W^T + b",
    "mlp": "E = gelu_tanh(LN(X) W1^T + b1) W2^T + b2, LN(X) = (X - mean(X)) / sqrt(var(X) + eps) * ln_weight "
           "+ ln_bias over the last dim (biased variance), gelu_tanh(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + "
           "0.044715 x^3)))",
}
PREFIX_TENSORS = {
    "linear": {"W": "proj.weight", "b": "proj.bias"},
    "mlp": {"ln_weight": "proj.0.weight", "ln_bias": "proj.0.bias", "W1": "proj.1.weight", "b1": "proj.1.bias",
            "W2": "proj.3.weight", "b2": "proj.3.bias"},
}
README = """# {name}: a GPT-2 with a prefix encoder, written by mmgpt

- config.json, model.safetensors, generation_config.json: the language model, loadable with
  `transformers.GPT2LMHeadModel.from_pretrained(this_dir)`.
- tokenizer.json, tokenizer_config.json: `transformers.AutoTokenizer.from_pretrained(this_dir)`.{byte_note}
- prefix_encoder.safetensors, prefix_encoder.json: maps raw prefix features X (B, P, {prefix_dim}) to P
  embeddings E (B, P, {n_embd}); prefix_encoder.json states the function and every tensor's shape.

mmgpt's input is [E; token embeddings], with learned positions 0, 1, ... over both, which is exactly what
GPT-2 computes for `inputs_embeds`. With mmgpt installed:

    import torch, transformers
    from mmgpt.hf import load_prefix_encoder
    hf = transformers.GPT2LMHeadModel.from_pretrained(this_dir)
    tok = transformers.AutoTokenizer.from_pretrained(this_dir)
    X = ...  # (1, P, {prefix_dim}) float32: the prefix features, as mmgpt was given them
    ids = torch.tensor([[tok.bos_token_id]])  # mmgpt's default prompt: BOS alone
    embeds = torch.cat([load_prefix_encoder(this_dir)(X), hf.get_input_embeddings()(ids)], dim=1)
    out = hf.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                      max_new_tokens=32, do_sample=False)
    print(tok.decode(out[0], skip_special_tokens=True))

The same embeddings serve vLLM (`prompt_embeds`) or TensorRT-LLM's prompt table.
"""
BYTE_NOTE = """
  This model was trained with mmgpt's byte-level tokenizer; it is written as an equivalent byte-level BPE with
  no merges (token id = UTF-8 byte value, specials at mmgpt's ids)."""


def _hf_config(config: GPTConfig, tokenizer: HFTokenizer, dtype: torch.dtype) -> dict:
    activation = next(theirs for theirs, ours in ACTIVATIONS.items() if ours == config.activation)
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            **{theirs: getattr(config, ours) for theirs, ours in SAME_FIELDS.items()},
            "n_inner": None, "activation_function": activation,
            **{field: value for field, (value, _) in FIXED_FIELDS.items()},
            "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
            "initializer_range": 0.02, "use_cache": True, "bos_token_id": tokenizer.bos_id,
            "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id,
            "dtype": str(dtype).removeprefix("torch.")}


def _prefix_spec(model: MultimodalGPT, tensors: dict[str, torch.Tensor]) -> dict:
    c = model.config
    spec = {"format": "mmgpt-prefix-encoder", "version": 1, "kind": c.prefix_encoder, "prefix_dim": c.prefix_dim,
            "n_embd": c.n_embd, "function": PREFIX_FUNCTIONS[c.prefix_encoder],
            "input": f"X (batch, prefix_len, {c.prefix_dim}) float: the raw prefix features mmgpt was trained on",
            "output": f"E (batch, prefix_len, {c.n_embd}): inputs_embeds for the prefix positions, ahead of the "
                      "token embeddings; the language model adds positions 0, 1, ... to both",
            "dtype": str(next(iter(tensors.values())).dtype).removeprefix("torch."),
            "tensors_file": PREFIX_WEIGHTS,  # tensor name (the function's symbol) -> shape
            "tensors": {sym: list(t.shape) for sym, t in tensors.items()}}
    if c.prefix_encoder == "mlp":
        spec["eps"] = model.prefix_encoder.proj[0].eps
    return spec


def save_hf_gpt2(model: MultimodalGPT, tokenizer: TextTokenizer, directory) -> Path:
    """Write `model` as a transformers-loadable GPT-2 directory plus its prefix encoder (see README in it).

    Written into a temporary sibling that replaces `directory` only when complete.
    """
    c = model.config
    if not c.bias:
        raise HFFormatError("transformers' GPT-2 always has biases; a model.bias=false model has no HF equivalent")
    byte_level = isinstance(tokenizer, ByteTokenizer)
    tokenizer = as_hf_tokenizer(tokenizer)
    check_tokenizer_fits(tokenizer, c)
    params = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    dtype = params["transformer.wte.weight"].dtype
    lm = {k: (v.t() if k.endswith(CONV1D_WEIGHTS) else v).contiguous() for k, v in params.items()
          if not k.startswith("prefix_encoder.") and not (c.tie_weights and k == "lm_head.weight")}
    names = PREFIX_TENSORS[c.prefix_encoder]
    prefix = {sym: params[f"prefix_encoder.{name}"].contiguous() for sym, name in names.items()}
    directory = Path(directory)
    with staging_dir(directory) as tmp:
        (tmp / "config.json").write_text(json.dumps(_hf_config(c, tokenizer, dtype), indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id},
            indent=2) + "\n")
        save_file(lm, tmp / "model.safetensors", metadata={"format": "pt"})
        tokenizer.save_files(tmp)
        save_file(prefix, tmp / PREFIX_WEIGHTS, metadata={"format": "pt"})
        (tmp / PREFIX_SPEC).write_text(json.dumps(_prefix_spec(model, prefix), indent=2) + "\n")
        (tmp / "README.md").write_text(README.format(
            name=directory.name, prefix_dim=c.prefix_dim, n_embd=c.n_embd,
            byte_note=BYTE_NOTE if byte_level else ""))
    return directory


@dataclass
class PrefixProjector:
    """prefix_encoder.json's function over prefix_encoder.safetensors' tensors: (B, P, F) -> (B, P, C). Computed
    from the description alone, not with mmgpt's module, as any other runtime would have to."""
    kind: str
    tensors: dict[str, torch.Tensor]
    eps: float | None  # the LayerNorm's, for "mlp"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tensors
        x = x.to(next(iter(t.values())).dtype)  # features arrive as float32 whatever the weights' dtype
        if self.kind == "linear":
            return F.linear(x, t["W"], t["b"])
        h = F.layer_norm(x, x.shape[-1:], t["ln_weight"], t["ln_bias"], self.eps)
        return F.linear(F.gelu(F.linear(h, t["W1"], t["b1"]), approximate="tanh"), t["W2"], t["b2"])


def load_prefix_encoder(directory, device: str | torch.device = "cpu") -> PrefixProjector:
    """The prefix encoder of a directory save_hf_gpt2 wrote."""
    directory = Path(directory)
    spec_path = directory / PREFIX_SPEC
    if not spec_path.is_file():
        raise HFFormatError(f"{directory}: no {PREFIX_SPEC}; only directories written by mmgpt's save_hf_gpt2 "
                            "have a prefix encoder")
    spec = json.loads(spec_path.read_text())
    if spec.get("format") != "mmgpt-prefix-encoder" or spec.get("kind") not in PREFIX_TENSORS:
        raise HFFormatError(f"{spec_path}: not an mmgpt prefix-encoder description (format "
                            f"{spec.get('format')!r}, kind {spec.get('kind')!r})")
    return PrefixProjector(spec["kind"], load_file(directory / PREFIX_WEIGHTS, device=str(device)), spec.get("eps"))
