"""An export directory: artifacts/<name>/{prefill,decode,context_generation}.onnx, weights.bin, model.json,
parity.json and, once built, engines. `Artifacts` reads and validates one."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from mmgpt.tokenizer import ByteTokenizer

MODEL_JSON = "model.json"


class ArtifactsError(ValueError):
    pass


class Artifacts:
    def __init__(self, path):
        self.path = Path(path)
        meta_path = self.path / MODEL_JSON
        if not meta_path.is_file():
            raise ArtifactsError(f"{self.path}: no {MODEL_JSON} here; run `python export.py` first, or point "
                                 "artifacts= at a directory export.py wrote")
        try:
            self.meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise ArtifactsError(f"{meta_path}: not valid JSON ({e.msg}); re-run `python export.py`") from None
        for graph in self.meta["graphs"].values():
            f = self.path / graph["file"]
            if not f.is_file():
                raise ArtifactsError(f"{f}: missing; the export is incomplete, re-run `python export.py`")

    @property
    def torch_dtype(self) -> torch.dtype:
        """The exported weights' dtype (model.json `dtype`: float32 | float16 | bfloat16)."""
        return getattr(torch, self.meta["dtype"])

    @property
    def tokenizer(self) -> ByteTokenizer:
        return ByteTokenizer.from_dict(self.meta["tokenizer"])

    def graph_path(self, name: str) -> Path:
        if name not in self.meta["graphs"]:
            raise ArtifactsError(f"{self.path}: no '{name}' graph; it has {sorted(self.meta['graphs'])}")
        return self.path / self.meta["graphs"][name]["file"]

    def update_meta(self, **fields) -> None:
        self.meta.update(fields)
        write_json_atomic(self.path / MODEL_JSON, self.meta)


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


@contextmanager
def staging_dir(final: Path):
    """Yield a temporary sibling of `final`; on success it replaces `final` whole, on failure it is removed.
    A reader never sees a half-written artifacts directory."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def find_latest_artifacts(root) -> Path:
    root = Path(root)
    found = sorted((p.parent for p in root.glob(f"*/{MODEL_JSON}")), key=lambda p: (p / MODEL_JSON).stat().st_mtime)
    if not found:
        raise ArtifactsError(f"no exported model under {root.resolve()}; run `python export.py` first")
    return found[-1]
