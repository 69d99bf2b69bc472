"""Tokenizers: byte-level (every UTF-8 byte is a token, plus BOS / EOS / PAD; no files), or a Hugging Face
tokenizer (GPT-2 byte-level BPE) read from local files through the `tokenizers` library.

Both have the same interface: `bos_id`, `eos_id`, `pad_id`, `vocab_size`, `encode`, `decode`, `to_dict()`;
`tokenizer_from_dict` rebuilds either from what a checkpoint or model.json stored.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from mmgpt.errors import UserError


@dataclass(frozen=True)
class ByteTokenizer:
    bos_id: int = 256
    eos_id: int = 257
    pad_id: int = 258

    @property
    def vocab_size(self) -> int:
        return max(self.bos_id, self.eos_id, self.pad_id) + 1

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        """Decode up to the first EOS; special tokens are dropped."""
        out = bytearray()
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i < 256:
                out.append(i)
        return out.decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        return {"type": "byte", **asdict(self)}

    def save(self, directory) -> dict:
        """Nothing to write: the dict alone rebuilds it."""
        return self.to_dict()

    @classmethod
    def from_dict(cls, d: dict) -> "ByteTokenizer":
        if d.get("type") != "byte":
            raise UserError(f"unknown tokenizer type {d.get('type')!r}; mmgpt saves 'byte' tokenizers")
        return cls(bos_id=d["bos_id"], eos_id=d["eos_id"], pad_id=d["pad_id"])


class TokenizerError(UserError):
    """Tokenizer files are missing or lack what mmgpt needs; the message says which and what to do."""


GPT2_END_OF_TEXT = "<|endoftext|>"
SPECIAL_TOKEN_FILES = ("tokenizer_config.json", "special_tokens_map.json")


class HFTokenizer:
    """A `tokenizers.Tokenizer` behind ByteTokenizer's interface. GPT-2 convention: BOS = EOS = PAD =
    `<|endoftext|>` unless the tokenizer's config names others. Because the training collate builds targets
    from each caption's ids (not by masking PAD ids), EOS is still learned once when PAD = EOS."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, bos_id: int, eos_id: int, pad_id: int):
        self.tokenizer = tokenizer
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        # highest id + 1, not the token count: a vocabulary may have gaps, and the model's rows are indexed by id
        self.vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        # add_special_tokens=False: BOS / EOS are placed here, never by a post-processor in the file
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        """Decode generated ids up to the first EOS; special tokens and ids outside the vocabulary (a model's
        vocabulary may be padded past the tokenizer's) are dropped. Bytes of a character split across tokens
        are joined before UTF-8 decoding, so only a character cut off at the very end becomes U+FFFD."""
        kept = []
        for i in map(int, ids):
            if i == self.eos_id:
                break
            if i not in (self.bos_id, self.pad_id) and 0 <= i < self.vocab_size:
                kept.append(i)
        return self.tokenizer.decode(kept, skip_special_tokens=True)

    def to_dict(self) -> dict:
        # The tokenizer JSON is embedded (1-2 MB for GPT-2), not referenced by file name: a .ckpt is one
        # file that must rebuild its model alone, and model.json then needs no sibling file to stay valid.
        return {"type": "hf", "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id,
                "tokenizer_json": self.tokenizer.to_str()}

    @classmethod
    def from_dict(cls, d: dict, directory=None) -> "HFTokenizer":
        """From `to_dict()` (the JSON embedded: checkpoints) or `save()` (a file in `directory`: artifacts)."""
        if d.get("type") != "hf":
            raise TokenizerError(f"not a Hugging Face tokenizer entry (type {d.get('type')!r})")
        if "file" in d:
            path = Path(directory or ".") / d["file"]
            if not path.is_file():
                raise TokenizerError(f"{path}: missing; the artifacts directory is incomplete: copy it again or "
                                     "re-run `python export.py`")
            tok = tokenizers.Tokenizer.from_file(str(path))
        else:
            tok = tokenizers.Tokenizer.from_str(d["tokenizer_json"])
        return cls(tok, d["bos_id"], d["eos_id"], d["pad_id"])

    def save(self, directory) -> dict:
        """Into an artifacts directory: the tokenizer files (below), and a dict that refers to them instead of
        embedding the JSON, so that model.json stays readable."""
        self.save_files(directory)
        return {"type": "hf", "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id,
                "file": "tokenizer.json"}

    def save_files(self, directory) -> None:
        """Write what `transformers.AutoTokenizer.from_pretrained(directory)` needs: tokenizer.json (vocabulary,
        merges, pre-tokenizer, decoder and added tokens in one file) and tokenizer_config.json (the class and
        the special tokens, which tokenizer.json does not mark as BOS / EOS / PAD). vocab.json + merges.txt are
        not written: tokenizer.json holds everything they do, and transformers prefers it."""
        directory = Path(directory)
        self.tokenizer.save(str(directory / "tokenizer.json"))
        token = self.tokenizer.id_to_token
        config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": token(self.bos_id),
                  "eos_token": token(self.eos_id), "pad_token": token(self.pad_id)}
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


TextTokenizer = ByteTokenizer | HFTokenizer


def tokenizer_from_dict(d: dict, directory=None) -> TextTokenizer:
    """Rebuild a tokenizer from its `to_dict()` or `save()` form, whichever type it is; `directory` holds the
    files a saved one refers to."""
    kind = d.get("type") if isinstance(d, dict) else None
    if kind == "byte":
        return ByteTokenizer.from_dict(d)
    if kind == "hf":
        return HFTokenizer.from_dict(d, directory)
    raise TokenizerError(f"unknown tokenizer type {kind!r}; mmgpt saves 'byte' and 'hf'")


def _byte_level_bpe(model: models.BPE, use_regex: bool = True) -> tokenizers.Tokenizer:
    """GPT-2's pipeline around a BPE model: bytes become printable characters before BPE, and bytes again after
    (`use_regex`: GPT-2's split into words and punctuation first)."""
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)
    tok.decoder = decoders.ByteLevel()
    return tok


def _named_special_tokens(directory: Path) -> dict[str, str]:
    """bos_token / eos_token / pad_token as named by tokenizer_config.json, else special_tokens_map.json."""
    names: dict[str, str] = {}
    for fname in SPECIAL_TOKEN_FILES:
        path = directory / fname
        if not path.is_file():
            continue
        try:
            cfg = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{path}: not valid JSON ({getattr(e, 'msg', e)})") from None
        if not isinstance(cfg, dict):
            raise TokenizerError(f"{path}: must hold a JSON object, got {type(cfg).__name__}")
        for role in ("bos_token", "eos_token", "pad_token"):
            value = cfg.get(role)
            if isinstance(value, dict):  # transformers also writes {"content": "<|endoftext|>", "lstrip": ...}
                value = value.get("content")
            if isinstance(value, str):
                names.setdefault(role, value)
    return names


def _read_tokenizer_files(read, path: Path):
    """`tokenizers` raises a bare Exception naming no file for a truncated or malformed one: name it here."""
    try:
        return read()
    except Exception as e:  # noqa: BLE001 -- the library's only error type for a bad file
        raise TokenizerError(f"{path}: not a readable Hugging Face tokenizer file ({str(e)[:200]}); copy the "
                             "tokenizer files again") from None


def load_hf_tokenizer(directory) -> HFTokenizer:
    """A local Hugging Face tokenizer: tokenizer.json, or vocab.json + merges.txt (GPT-2 byte-level BPE).

    EOS is the `eos_token` that tokenizer_config.json / special_tokens_map.json name, else GPT-2's
    `<|endoftext|>`; BOS and PAD are the named ones, else EOS. No hub access: only files in `directory`.
    """
    directory = Path(directory)
    if (directory / "tokenizer.json").is_file():
        tok = _read_tokenizer_files(lambda: tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json")),
                                    directory / "tokenizer.json")
    elif (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
        tok = _read_tokenizer_files(lambda: _byte_level_bpe(models.BPE.from_file(
            str(directory / "vocab.json"), str(directory / "merges.txt"))), directory / "vocab.json + merges.txt")
    else:
        present = [f for f in ("vocab.json", "merges.txt") if (directory / f).is_file()]
        raise TokenizerError(f"{directory}: no tokenizer.json or vocab.json + merges.txt"
                             f"{f' (only {present[0]})' if present else ''}; copy the model's tokenizer files "
                             "there (transformers: `AutoTokenizer.from_pretrained(name).save_pretrained(dir)`)")
    named = _named_special_tokens(directory)
    eos = named.get("eos_token", GPT2_END_OF_TEXT)
    ids = {}
    for role, token in (("eos_token", eos), ("bos_token", named.get("bos_token", eos)),
                        ("pad_token", named.get("pad_token", eos))):
        ids[role] = tok.token_to_id(token)
        if ids[role] is None:
            source = (f"named as {role} in {' or '.join(SPECIAL_TOKEN_FILES)}" if role in named else
                      f"GPT-2's end-of-text token; no eos_token in {' or '.join(SPECIAL_TOKEN_FILES)}")
            raise TokenizerError(f"{directory}: the vocabulary has no {token!r} ({source}); name the tokenizer's "
                                 "end-of-text token as eos_token in tokenizer_config.json")
    # Marked special so that encode never splits them and decode drops them, as transformers does for GPT-2.
    tok.add_special_tokens([AddedToken(tok.id_to_token(i), special=True, normalized=False) for i in set(ids.values())])
    return HFTokenizer(tok, bos_id=ids["bos_token"], eos_id=ids["eos_token"], pad_id=ids["pad_token"])


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet of every byte-level BPE vocabulary."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def as_hf_tokenizer(tok: TextTokenizer) -> HFTokenizer:
    """The same tokenizer as a Hugging Face one. A ByteTokenizer becomes a byte-level BPE with no merges and no
    regex split: each byte is one token with the byte's value as id, and the special tokens keep their ids, so
    a model trained with it can be served with `AutoTokenizer` too."""
    if isinstance(tok, HFTokenizer):
        return tok
    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    names = {}
    for role, i in (("eos", tok.eos_id), ("bos", tok.bos_id), ("pad", tok.pad_id)):
        names.setdefault(i, f"<|{role}|>")  # one name per id: roles may share an id
    vocab.update({name: i for i, name in names.items()})
    hf = _byte_level_bpe(models.BPE(vocab, []), use_regex=False)
    hf.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in names.values()])
    return HFTokenizer(hf, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)


def check_tokenizer_fits(tokenizer: TextTokenizer, config) -> None:
    """Every id the tokenizer can produce must index a row of the model's embedding (config.vocab_size)."""
    if tokenizer.vocab_size > config.vocab_size:
        raise TokenizerError(f"the tokenizer has ids up to {tokenizer.vocab_size - 1}, but the model's vocab_size "
                             f"is {config.vocab_size}; use the model's own tokenizer, or a model with "
                             f"vocab_size >= {tokenizer.vocab_size}")
