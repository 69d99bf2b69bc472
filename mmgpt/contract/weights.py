"""weights.bin: one file holding every weight once, shared by all ONNX graphs (external data) and read by the
PyTorch backends through the manifest's tensor index. Checked against its hash before any backend uses it."""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from mmgpt.contract.manifest import ArtifactsError, TensorLocation, WeightsFile

CHUNK = 64 << 20
_verified: dict[tuple, str] = {}  # (path, size, mtime, inode) -> hash already checked by this process


def tree_hash(path: Path) -> str:
    """sha256 over the sha256 of each 64 MiB chunk, the chunks hashed in parallel threads (hashlib releases the
    GIL): ~1.5 GB/s per core, so a 3 GB file checks in well under a second on a GPU host's cores."""
    size = os.path.getsize(path)

    def chunk_digest(offset):
        with open(path, "rb") as f:
            f.seek(offset)
            return hashlib.sha256(f.read(CHUNK)).digest()
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(chunk_digest, range(0, size, CHUNK)))
    return hashlib.sha256(f"{size}:".encode() + b"".join(digests)).hexdigest()


def verify(directory: Path, weights: WeightsFile) -> None:
    """The file's size and hash must be the manifest's: a flipped bit gives wrong output, never silently."""
    path = Path(directory) / weights.file
    if not path.is_file():
        raise ArtifactsError(f"{path}: missing; the export is incomplete: re-run `python export.py`")
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if _verified.get(key) == weights.sha256_tree:
        return
    if st.st_size != weights.nbytes:
        raise ArtifactsError(f"{path}: {st.st_size} bytes, but model.json says {weights.nbytes}: the file was "
                             "truncated or replaced after export; copy the artifacts again or re-run "
                             "`python export.py`")
    if tree_hash(path) != weights.sha256_tree:
        raise ArtifactsError(f"{path}: its contents do not match the hash in model.json (damaged or modified after "
                             "export); copy the artifacts again or re-run `python export.py`")
    _verified[key] = weights.sha256_tree


def _raw(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()


def index_state_dict(state: dict[str, torch.Tensor], blob, offsets: dict[bytes, int]) -> dict[str, TensorLocation]:
    """Locate every tensor of `state` in the open weights file `blob`: where the same bytes, or the matrix's
    transpose (the graphs fold nn.Linear's W into W^T), were already written by the graphs' external data, reuse
    them; else append them. `offsets` maps content digests to offsets."""
    index = {}
    for name, t in state.items():
        dtype = str(t.dtype).removeprefix("torch.")
        transposed_key = content_key(_raw(t.t())) if t.dim() == 2 else None
        if transposed_key is not None and transposed_key in offsets and content_key(_raw(t)) not in offsets:
            index[name] = TensorLocation(offsets[transposed_key], list(t.shape), dtype, transposed=True)
            continue
        data = _raw(t)
        key = content_key(data)
        if key not in offsets:
            offsets[key] = append_aligned(blob, data)
        index[name] = TensorLocation(offsets[key], list(t.shape), dtype)
    return index


def content_key(data: bytes) -> bytes:
    return hashlib.sha256(data).digest() + len(data).to_bytes(8, "little")


def append_aligned(blob, data: bytes) -> int:
    """Append at a 64-byte boundary (readers may map tensors in place); returns the offset."""
    blob.write(b"\0" * ((-blob.tell()) % 64))
    offset = blob.tell()
    blob.write(data)
    return offset


def load_state_dict(directory: Path, weights: WeightsFile) -> dict[str, torch.Tensor]:
    """The model's parameters from weights.bin (mapped, then copied once into their own tensors)."""
    path = Path(directory) / weights.file
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    state = {}
    for name, loc in weights.tensors.items():
        dtype = getattr(torch, loc.dtype)
        n = int(np.prod(loc.shape)) * torch.tensor([], dtype=dtype).element_size()
        if loc.offset + n > len(raw):
            raise ArtifactsError(f"{path}: tensor {name} lies past the end of the file; re-run `python export.py`")
        buf = torch.from_numpy(np.array(raw[loc.offset: loc.offset + n])).view(dtype)
        state[name] = buf.reshape(loc.shape[::-1]).t().contiguous() if loc.transposed else buf.reshape(loc.shape)
    return state
