"""model.json: the typed, versioned manifest of an artifacts directory, written and validated here only.

Every reader (backends, engine build, inspection, infer) gets a `Manifest`, never the raw dict. A manifest from
another schema version, or one whose fields are missing or mistyped, is refused with "re-export".

Integrity by construction: the manifest records the size and hash of every file of the directory (`files`, plus
`weights` for weights.bin) and a hash of each of its own fields (`content_sha256`), so an edited field (n_head,
layer_norm_epsilon, a tokenizer id, the data config) is refused by name like a damaged file. Engines are built
into the directory later and carry their own record: they, and the `engines` field, are outside the seal.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mmgpt.contract.engines import EngineBuild
from mmgpt.contract.typed import build
from mmgpt.contract.graphs import BATCH, CACHE, PROMPT, ModelDims
from mmgpt.model import GPTConfig
from mmgpt.errors import UserError

SCHEMA_VERSION = 4  # 4: modalities (context inputs by modality, the decoded modality's logits)
MANIFEST_FILE = "model.json"
DTYPES = ("float32", "float16", "bfloat16")


class ArtifactsError(UserError):
    """An artifacts directory is missing, incomplete, damaged or from another version; the message says which
    file and what to do."""


@dataclass(frozen=True)
class TensorLocation:
    """One parameter inside weights.bin: raw little-endian bytes at `offset`, stored as its transpose where the
    graphs keep a matrix transposed (then the graphs' copy is the only one)."""
    offset: int
    shape: list[int]
    dtype: str
    transposed: bool = False


@dataclass(frozen=True)
class FileRecord:
    nbytes: int
    sha256_tree: str  # contract.weights.tree_hash


@dataclass(frozen=True)
class WeightsFile:
    file: str
    nbytes: int
    sha256_tree: str  # see contract.weights.tree_hash: sha256 over per-chunk sha256s, fast on multi-GB files
    tensors: dict[str, TensorLocation]  # every parameter of the model, by its PyTorch name


@dataclass(frozen=True)
class Limits:
    """Largest size of each dynamic dim the graphs were exported for (and engine profiles may use)."""
    max_batch: int
    max_context: int  # of each context modality's segment
    max_text: int  # of the decoded modality's prompt
    max_cache: int

    def by_symbol(self, dims: ModelDims) -> dict[str, int]:
        return {BATCH: self.max_batch, **{s: self.max_context for s in dims.context_symbols}, PROMPT: self.max_text,
                CACHE: self.max_cache}


@dataclass(frozen=True)
class GraphFile:
    file: str
    inputs: dict[str, dict]  # name -> {"dtype", "shape" (ints and symbols)}
    outputs: dict[str, dict]


@dataclass
class Manifest:
    name: str
    created: str
    source: str  # what was exported (a checkpoint path, for the record only: nothing reads it)
    model_config: dict  # GPTConfig fields
    tokenizer: dict  # mmgpt.tokenizer.tokenizer_from_dict's input; its files (if any) lie in the directory
    context_lens: dict[str, int]  # continuous context modality -> the length it was trained with (absent: any)
    data: dict | None  # the training data config (rebuilds the digits validation split)
    dtype: str  # float32 | float16 | bfloat16
    opset: int
    limits: Limits
    capacity_buckets: list[int]  # KV-cache capacities the decode loop may use
    weights: WeightsFile
    graphs: dict[str, GraphFile]
    engines: dict[str, EngineBuild] = field(default_factory=dict)  # strategy -> what engines/build.py built
    stats: dict = field(default_factory=dict)  # export statistics: node counts, sizes, timings
    files: dict[str, FileRecord] = field(default_factory=dict)  # every other file, by relative path (seal())
    content_sha256: dict[str, str] = field(default_factory=dict)  # field -> hash of its JSON (seal())
    schema_version: int = SCHEMA_VERSION

    @property
    def config(self) -> GPTConfig:
        return GPTConfig.from_dict(self.model_config)

    @property
    def dims(self) -> ModelDims:
        return ModelDims.of(self.config)

    @property
    def torch_dtype(self):
        import torch
        return getattr(torch, self.dtype)

    def to_dict(self) -> dict:
        return asdict(self)

    def write(self, directory: Path) -> None:
        from mmgpt.files import write_json
        write_json(Path(directory) / MANIFEST_FILE, self.to_dict())

    def seal(self, directory: Path, file_hashes: dict[str, FileRecord]) -> None:
        """Record every file of the directory (`file_hashes`: see contract.weights.record_files) and then the hash
        of each field, this record included: what `read` checks."""
        self.files = {k: v for k, v in sorted(file_hashes.items()) if k != self.weights.file}
        self.content_sha256 = field_hashes(json.loads(json.dumps(self.to_dict(), default=str)))

    def file_records(self) -> dict[str, FileRecord]:
        """Every file the directory must hold, by relative path, with its size and hash."""
        return {**self.files, self.weights.file: FileRecord(self.weights.nbytes, self.weights.sha256_tree)}

    @classmethod
    def read(cls, directory: Path) -> "Manifest":
        path = Path(directory) / MANIFEST_FILE
        if not path.is_file():
            raise ArtifactsError(f"{directory}: no {MANIFEST_FILE} here; run `python export.py` first, or point "
                                 "artifacts= at a directory export.py wrote")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ArtifactsError(f"{path}: not valid JSON ({e}); re-run `python export.py`") from None
        except OSError as e:
            raise ArtifactsError(f"{path}: cannot be read ({e.strerror or e}); check its permissions") from None
        version = raw.get("schema_version", 1) if isinstance(raw, dict) else None
        if version != SCHEMA_VERSION:
            raise ArtifactsError(f"{path}: written by another mmgpt version (schema {version}, this one reads "
                                 f"{SCHEMA_VERSION}); re-export: `python export.py ckpt=<its checkpoint>`")
        check_seal(path, raw)
        try:
            manifest = build(cls, raw, "")
            manifest.validate()
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactsError(f"{path}: {e}; it was edited or damaged: re-run `python export.py`") from None
        return manifest

    def validate(self) -> None:
        config = self.config  # GPTConfig validates its own fields
        if self.dtype not in DTYPES:
            raise UserError(f"dtype {self.dtype!r} is not one of {DTYPES}")
        for n, v in asdict(self.limits).items():
            if v < 1:
                raise UserError(f"limits.{n}={v} must be >= 1")
        if self.limits.max_cache > config.block_size:
            raise UserError(f"limits.max_cache={self.limits.max_cache} exceeds block_size={config.block_size}")
        if not self.capacity_buckets or min(self.capacity_buckets) < 1:
            raise UserError(f"capacity_buckets={self.capacity_buckets} must be a non-empty list of sizes >= 1")
        for name, n in self.context_lens.items():
            if not 0 <= n <= self.limits.max_context:
                raise UserError(f"context_lens.{name}={n} lies outside [0, limits.max_context]")


UNSEALED = ("engines", "content_sha256")  # engines are built into the directory later, with their own record


def field_hashes(raw: dict) -> dict[str, str]:
    """A hash of each sealed field, one level into objects so that an edit names e.g. `model_config.n_head`."""
    def digest(value):
        return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    out = {}
    for key, value in raw.items():
        if key in UNSEALED:
            continue
        out[key] = digest(value)
        if isinstance(value, dict):
            out.update({f"{key}.{k}": digest(v) for k, v in value.items()})
    return out


def check_seal(path: Path, raw: dict) -> None:
    """Every field must be as the export wrote it: an edited model.json would decode wrongly, never loudly."""
    recorded = raw.get("content_sha256")
    if not isinstance(recorded, dict) or not recorded:
        raise ArtifactsError(f"{path}: field 'content_sha256' is missing or damaged, so its content cannot be "
                             "checked; re-export: `python export.py ckpt=<its checkpoint>`")
    now = field_hashes(raw)
    changed = sorted(k for k in set(now) | set(recorded) if now.get(k) != recorded.get(k))
    if changed:
        # the most specific names first: `model_config.n_head` rather than `model_config`
        named = [k for k in changed if not any(c.startswith(k + ".") for c in changed)]
        raise ArtifactsError(f"{path}: field(s) {', '.join(named[:5])}{' ...' if len(named) > 5 else ''} changed "
                             "after export (they no longer match the hashes model.json recorded); an edited manifest "
                             "would decode wrongly: re-export: `python export.py ckpt=<its checkpoint>`")

