"""GPU acceptance checks for the decode loop (issue: runtime). Run on a CUDA machine:

    python benchmarks/gpu_checks.py [--out benchmarks/results]

1. CUDA-graph replay gives exactly the tokens of un-captured execution, at batch 1 and 8 (greedy and seeded
   sampling), for the torch backend eager, with torch.compile, and with the fused Triton kernels.
2. A 256-token generation captures exactly one graph per bucket it used, and a second call captures none.
3. Seeded sampling is reproducible across calls under graph replay.
"""
import argparse
import datetime
import json
import os
from pathlib import Path

import torch

from mmgpt.bench.decode import build_model, versions
from mmgpt.runtime.backends.torch_model import TorchBackend
from mmgpt.runtime.generator import Generator
from mmgpt.runtime.sampling import SamplingConfig
from mmgpt.tokenizer import ByteTokenizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    dev = torch.device("cuda")
    model = build_model("124m", torch.float16, dev)
    tok = ByteTokenizer(bos_id=50256, eos_id=50256, pad_id=50256)
    checks = []
    from mmgpt.runtime.backends.fused_triton import TritonBackend
    for variant in ("torch", "torch-compile", "torch-triton"):
        backend = TritonBackend(model) if variant == "torch-triton" else TorchBackend(model, compile=variant != "torch")
        eager = Generator(backend, tok, max_positions=1024, cuda_graph=False, eos_check_interval=1000)
        graphed = Generator(backend, tok, max_positions=1024, cuda_graph=True, eos_check_interval=1000)
        for batch in (1, 8):
            g = torch.Generator().manual_seed(batch)
            prefix = torch.randn(batch, 64, model.config.prefix_dim, generator=g)
            prompts = [torch.randint(0, 50000, (1 + 5 * b % 32,), generator=g).tolist() for b in range(batch)]
            for sampling in (SamplingConfig(), SamplingConfig(temperature=0.8, top_k=50, top_p=0.95, seed=7)):
                before = graphed.graph_captures
                a = eager.generate(prefix, prompts, max_new_tokens=256, sampling=sampling)
                b = graphed.generate(prefix, prompts, max_new_tokens=256, sampling=sampling)
                captured = graphed.graph_captures - before
                c = graphed.generate(prefix, prompts, max_new_tokens=256, sampling=sampling)
                check = {"backend": variant, "batch": batch, "sampling": "greedy" if sampling.greedy else "seeded",
                         "capacity": b.capacity, "steps": b.decode_steps,
                         "graph_tokens_equal_eager": bool(torch.equal(a.tokens, b.tokens)),
                         "graphs_captured_first_call": captured, "graphs_captured_second_call":
                             graphed.graph_captures - before - captured,
                         "replay_reproducible": bool(torch.equal(b.tokens, c.tokens)),
                         "ragged_prompt_lengths": [len(p) for p in prompts]}
                if not check["graph_tokens_equal_eager"]:
                    diff = (a.tokens != b.tokens).nonzero()
                    check["first_mismatch"] = diff[0].tolist() if len(diff) else None
                checks.append(check)
                print(json.dumps(check), flush=True)
    report = {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(dev),
              "versions": versions(dev), "model": "GPT-2 124M shape, random weights, fp16, 64-patch prefix",
              "checks": checks}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{report['date']}-{report['gpu'].replace(' ', '-')}-graph-checks.json"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
