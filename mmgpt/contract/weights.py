"""weights.bin: one file holding every weight once, shared by all ONNX graphs (external data) and read by the
PyTorch backends through the manifest's tensor index. It and every other file of the directory are checked against
their hashes before any backend uses them."""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from mmgpt.contract.manifest import MANIFEST_FILE, ArtifactsError, FileRecord, TensorLocation, WeightsFile

CHUNK = 64 << 20
_verified: dict[tuple, str] = {}  # (path, size, mtime, inode) -> hash already checked by this process


def tree_hashes(paths: list[Path]) -> list[str]:
    """For each file, sha256 over the sha256 of each 64 MiB chunk; every chunk of every file is hashed in one pool
    of threads (hashlib releases the GIL): ~1.5 GB/s per core, so a 3 GB file checks in well under a second on a
    GPU host's cores, and the small files of a directory cost no extra round of waiting."""
    sizes = [os.path.getsize(p) for p in paths]

    def chunk_digest(job):
        path, offset = job
        with open(path, "rb") as f:
            f.seek(offset)
            return hashlib.sha256(f.read(CHUNK)).digest()
    jobs = [[(p, o) for o in range(0, size, CHUNK)] for p, size in zip(paths, sizes)]
    with ThreadPoolExecutor(max_workers=hash_threads()) as pool:
        flat = list(pool.map(chunk_digest, [j for file_jobs in jobs for j in file_jobs]))
    out, start = [], 0
    for size, file_jobs in zip(sizes, jobs):
        digests, start = flat[start: start + len(file_jobs)], start + len(file_jobs)
        out.append(hashlib.sha256(f"{size}:".encode() + b"".join(digests)).hexdigest())
    return out


def hash_threads() -> int:
    """One thread per core this process may run on (its affinity, not the machine's count), at most 16."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return min(16, cores or 1)


def tree_hash(path: Path) -> str:
    return tree_hashes([Path(path)])[0]


def is_recorded(relative: Path) -> bool:
    """Files the manifest records: all but itself, hidden temporaries, and engines with their build records (built
    into the directory later, on the machine that runs them; each engine's record names the weights it holds)."""
    name = relative.name
    return (str(relative) != MANIFEST_FILE and not any(part.startswith(".") for part in relative.parts)
            and not name.endswith((".engine", ".engine.json")))


def record_files(directory: Path) -> dict[str, FileRecord]:
    """Size and hash of every recorded file under `directory`, by relative path."""
    directory = Path(directory)
    paths = sorted(p for p in directory.rglob("*") if p.is_file() and is_recorded(p.relative_to(directory)))
    keys = {p: _version(p) for p in paths}
    todo = [p for p in paths if keys[p] not in _verified]
    _verified.update({keys[p]: h for p, h in zip(todo, tree_hashes(todo))})
    return {str(p.relative_to(directory)): FileRecord(keys[p][1], _verified[keys[p]]) for p in paths}


def _version(path: Path) -> tuple:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino


def verify_files(directory: Path, records: dict[str, FileRecord]) -> None:
    """Every file the manifest records must have its size and hash: a flipped bit, a truncated graph, a tokenizer
    with edited merges or an .onnx from another export gives wrong output, never silently. Hashes are checked once
    per process and file version (path, size, mtime, inode), all files at once in parallel."""
    directory = Path(directory)
    todo = []
    for name, record in records.items():
        path = directory / name
        if not path.is_file():
            raise ArtifactsError(f"{path}: missing; the export is incomplete: copy the artifacts again or re-export "
                                 "(`python export.py`)")
        key = _version(path)
        if key[1] != record.nbytes:
            raise ArtifactsError(f"{path}: {key[1]} bytes, but model.json says {record.nbytes}: the file was "
                                 "truncated or replaced after export; copy the artifacts again or re-export "
                                 "(`python export.py`)")
        if _verified.get(key) != record.sha256_tree:
            todo.append((path, key, record.sha256_tree))
    try:
        hashes = tree_hashes([p for p, _, _ in todo])
    except OSError as e:
        raise ArtifactsError(f"{e.filename}: cannot be read ({e.strerror or e}); check its permissions") from None
    for (path, key, want), have in zip(todo, hashes):
        if have != want:
            raise ArtifactsError(f"{path}: its contents do not match the hash in model.json (damaged, or replaced "
                                 "by another export's file); copy the artifacts again or re-export "
                                 "(`python export.py`)")
        _verified[key] = want


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
