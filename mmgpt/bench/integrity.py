"""What the integrity checks cost: hashing a GPT-2-124M-shaped weights.bin (fp32, ~500 MB) on a given number of
cores, and infer.py on an artifacts directory with and without the checks (file hashes, the manifest's field
hashes, the strict config check).

    python -m mmgpt.bench integrity [--artifacts artifacts/<digits run>] [--cores 2] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mmgpt.bench.decode import versions
from mmgpt.bench.results import git_commit, write_result
from mmgpt.contract import weights as weights_file
from mmgpt.model import GPTConfig, MultimodalGPT, image_to_text
from mmgpt.throughput import device_name


def _median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_hash(repeats: int) -> dict:
    """tree_hash of a file the size of GPT-2-124M's fp32 parameters (the bytes are random: hashing does not care),
    in the page cache as it is right after export or a first load."""
    with torch.device("meta"):
        n = MultimodalGPT(GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257,
                                    **image_to_text(16))).num_params()
    nbytes = n * 4
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "weights.bin"
        rng = np.random.default_rng(0)
        with open(path, "wb") as f:
            for start in range(0, nbytes, 64 << 20):
                f.write(rng.integers(0, 256, min(64 << 20, nbytes - start), dtype=np.uint8).tobytes())
        weights_file.tree_hash(path)  # into the page cache
        seconds = _median_s(lambda: weights_file.tree_hash(path), repeats)
    return {"params": n, "bytes": nbytes, "seconds": round(seconds, 4), "gb_per_s": round(nbytes / seconds / 1e9, 2),
            "threads": weights_file.hash_threads()}


def bench_infer(artifacts: Path, repeats: int, limit: int) -> dict:
    """infer() in-process on `artifacts`, every check on and each load's hashes recomputed (the per-process cache
    cleared), against the same with the file hashes, the field hashes and the config check turned off."""
    from hydra import compose, initialize_config_dir

    import mmgpt.contract.artifacts as artifacts_mod
    import mmgpt.contract.manifest as manifest_mod
    from mmgpt.inference import infer
    from mmgpt.strict_config import CONF, check_config
    overrides = [f"artifacts={artifacts}", f"limit={limit}", "show=0"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="infer", overrides=overrides)

    def checked():
        weights_file._verified.clear()
        infer(check_config(cfg, "infer", overrides))

    def unchecked():
        infer(cfg)
    infer(cfg)  # warm-up: imports, ONNX Runtime's first session
    real = (manifest_mod.check_seal, artifacts_mod.weights_file.verify_files)
    t_check = _median_s(lambda: check_config(cfg, "infer", overrides), repeats)
    t_verify = _median_s(lambda: (weights_file._verified.clear(), artifacts_mod.Artifacts.open(artifacts)), repeats)
    with_checks = _median_s(checked, repeats)
    manifest_mod.check_seal = lambda *a: None
    artifacts_mod.weights_file.verify_files = lambda *a: None
    try:
        without = _median_s(unchecked, repeats)
    finally:
        manifest_mod.check_seal, artifacts_mod.weights_file.verify_files = real
    files = sum(p.stat().st_size for p in Path(artifacts).rglob("*") if p.is_file())
    return {"artifacts": str(artifacts), "artifact_bytes": files, "limit": limit,
            "infer_with_checks_s": round(with_checks, 4), "infer_without_checks_s": round(without, 4),
            "added_s": round(with_checks - without, 4), "config_check_s": round(t_check, 4),
            "open_and_verify_s": round(t_verify, 4)}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m mmgpt.bench integrity", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", default=None, help="an artifacts directory to time infer.py on (e.g. digits)")
    ap.add_argument("--cores", type=int, default=2, help="pin the process to this many cores (0: all)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--limit", type=int, default=64, help="infer.py limit=")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    if args.cores:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.cores])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = {"date": datetime.date.today().isoformat(), "gpu": device_name(device), "tag": "integrity",
              "commit": git_commit(), "versions": versions(device), "cores": len(os.sched_getaffinity(0)),
              "load_average": os.getloadavg(), "hash_124m_fp32": bench_hash(args.repeats)}
    if args.artifacts:
        report["infer"] = bench_infer(Path(args.artifacts), args.repeats, args.limit)
    path = write_result(args.out, report, "integrity")
    print(f"hash of {report['hash_124m_fp32']['bytes'] / 1e6:.0f} MB on {report['cores']} cores: "
          f"{report['hash_124m_fp32']['seconds']:.3f} s")
    if "infer" in report:
        r = report["infer"]
        print(f"infer.py on {args.artifacts}: {r['infer_with_checks_s']:.3f} s with the checks, "
              f"{r['infer_without_checks_s']:.3f} s without ({r['added_s'] * 1e3:+.1f} ms)")
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
