"""Byte-level tokenizer: every UTF-8 byte is a token, plus BOS / EOS / PAD.

It has no vocabulary file: `to_dict()` is all a checkpoint or model.json needs to rebuild it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


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
        """Nothing to write: the dict rebuilds it."""
        return self.to_dict()

    @classmethod
    def from_dict(cls, d: dict) -> "ByteTokenizer":
        if d.get("type") != "byte":
            raise ValueError(f"unknown tokenizer type {d.get('type')!r}; mmgpt saves 'byte' tokenizers")
        return cls(bos_id=d["bos_id"], eos_id=d["eos_id"], pad_id=d["pad_id"])


def tokenizer_from_dict(d: dict, directory=None):
    """Rebuild a tokenizer from its `to_dict()` / `save()` form; `directory` holds its files, if it has any."""
    if not isinstance(d, dict) or "type" not in d:
        raise ValueError(f"not a tokenizer description: {str(d)[:100]}")
    if d["type"] == "byte":
        return ByteTokenizer.from_dict(d)
    raise ValueError(f"unknown tokenizer type {d['type']!r}; mmgpt knows 'byte'")
