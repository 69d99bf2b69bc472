"""GPU acceptance checks for the decode loop. Run on a CUDA machine, with mmgpt installed (scripts/setup.sh) or
from the repository root of a clone (PYTHONPATH=. makes `import mmgpt` find it):

    PYTHONPATH=. python benchmarks/gpu_checks.py --out DIR [--artifacts artifacts/<a trained export>]

1. CUDA-graph replay gives exactly the tokens of un-captured execution, at batch 1 and 8 (greedy and seeded
   sampling), for the torch backend eager, with torch.compile, and with the fused Triton kernels; a second call
   captures nothing; one generator serving 32, then 200, then 32 new tokens replays the first bucket's graph with
   the first bucket's tokens (buckets keep their own buffers and graphs).
2. A decode step that cannot be captured (it synchronises with the host) runs un-captured with a warning that says
   why, and gives the same tokens.
3. With --artifacts (a trained model, e.g. the digits_gpt2_124m run): the fused Triton kernels give exactly the
   torch backend's greedy tokens on the validation split at batch 1, 8, 64 and 256, with the model's own prefix
   and with the images' patches repeated to 0, 64 and 576 positions (--trained-only: this check alone).
Writes DIR/<date>-<gpu>-gpu-checks.json.
"""
import argparse
import datetime
import json
import warnings
from pathlib import Path

import torch

from mmgpt.bench.decode import build_model, versions
from mmgpt.bench.results import write_result
from mmgpt.contract.artifacts import Artifacts
from mmgpt.data.inputs import load_inputs
from mmgpt.runtime.backends.fused_triton import TritonBackend
from mmgpt.runtime.backends.torch_model import TorchBackend
from mmgpt.runtime.generator import Generator
from mmgpt.runtime.sampling import SamplingConfig
from mmgpt.tokenizer import ByteTokenizer

DEV = torch.device("cuda")


def graph_replay(model, tok) -> list[dict]:
    checks = []
    for variant in ("torch", "torch-compile", "torch-triton"):
        backend = TritonBackend(model) if variant == "torch-triton" else TorchBackend(model, compile=variant != "torch")
        eager = Generator(backend, tok, max_positions=1024, cuda_graph=False, eos_check_interval=1000)
        graphed = Generator(backend, tok, max_positions=1024, cuda_graph=True, eos_check_interval=1000)
        for batch in (1, 8):
            g = torch.Generator().manual_seed(batch)
            prefix = torch.randn(batch, 64, model.config.modality("image").dim, generator=g)
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
                         "equal_fraction": float((a.tokens == b.tokens).float().mean()),
                         "graphs_captured_first_call": captured,
                         "graphs_captured_second_call": graphed.graph_captures - before - captured,
                         "replay_reproducible": bool(torch.equal(b.tokens, c.tokens)),
                         "ragged_prompt_lengths": [len(p) for p in prompts]}
                checks.append(check)
                print(json.dumps(check), flush=True)
        # buckets interleaved: capacity 128, then 512, then 128 again (its own graph, its own buffers)
        g = torch.Generator().manual_seed(3)
        prefix = torch.randn(2, 64, model.config.modality("image").dim, generator=g)
        runs = [graphed.generate(prefix, max_new_tokens=n) for n in (32, 200, 32)]
        check = {"backend": variant, "check": "interleaved buckets 32 / 200 / 32 new tokens",
                 "capacities": [r.capacity for r in runs],
                 "third_equals_first": bool(torch.equal(runs[0].tokens, runs[2].tokens)),
                 "third_equals_eager": bool(torch.equal(runs[2].tokens,
                                                        eager.generate(prefix, max_new_tokens=32).tokens))}
        checks.append(check)
        print(json.dumps(check), flush=True)
    return checks


class HostSyncBackend(TorchBackend):
    """A decode step no CUDA graph can hold: it reads a value back to the host."""

    def decode(self, input_ids, position_ids, k_cache, v_cache):
        if float(position_ids.float().sum()) < 0:  # a host sync, never true
            raise AssertionError
        return super().decode(input_ids, position_ids, k_cache, v_cache)


def capture_fallback(model, tok) -> dict:
    prefix = torch.randn(2, 64, model.config.modality("image").dim, generator=torch.Generator().manual_seed(5))
    backend = HostSyncBackend(model)
    want = Generator(TorchBackend(model), tok, max_positions=1024, cuda_graph=False).generate(prefix, max_new_tokens=64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = Generator(backend, tok, max_positions=1024, cuda_graph=True).generate(prefix, max_new_tokens=64)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    check = {"check": "a step that cannot be captured falls back to un-captured replay",
             "warned": bool(messages), "warning": messages[0][:300] if messages else None,
             "ran_captured": got.cuda_graph, "tokens_equal": bool(torch.equal(want.tokens, got.tokens))}
    print(json.dumps(check), flush=True)
    return check


def prefix_of_length(prefixes: torch.Tensor, P: int) -> torch.Tensor:
    """The validation images' patches repeated (or cut) to P positions. The model was trained on its own prefix
    length only, but its language model is still a trained one: peaked logits, so greedy tokens are a fair check
    of the kernels at cache lengths the digits task never reaches."""
    reps = -(-P // prefixes.shape[1]) if P else 0
    return prefixes.repeat(1, reps, 1)[:, :P]


@torch.no_grad()
def top2_gap(model, prefix, bos_id: int, tokens) -> dict:
    """The torch model's two best logits where the backends parted: a gap of a few fp16 ulps of the largest logit
    is a near-tie that rounding order decides, not a kernel error."""
    ids = torch.tensor([[bos_id, *tokens.tolist()]], device=DEV)
    logits = model(prefix.to(DEV, model.lm_head.weight.dtype), ids)[0][0, -1].float()
    top = logits.topk(2).values
    return {"top2_gap": float(top[0] - top[1]), "top2_gap_relative": float((top[0] - top[1]) / logits.abs().max())}


def trained_model(path: Path) -> list[dict]:
    """Triton against torch on a trained model's validation split: exact greedy tokens expected, at batch 1, 8, 64,
    256 and prefix lengths 0, 64, 576 beside the model's own."""
    artifacts = Artifacts.open(path)
    model = artifacts.load_model(DEV)
    inputs = load_inputs("digits", artifacts.manifest.data, artifacts.manifest.config, artifacts.tokenizer)
    tok = artifacts.tokenizer
    gens = {name: Generator(b, tok, max_positions=model.config.block_size)
            for name, b in (("torch", TorchBackend(model)), ("torch-triton", TritonBackend(model)))}
    native = artifacts.manifest.context_lens.get("image")
    checks = []
    for P in (native, 0, 64, 576):
        if P + 1 + 32 > model.config.block_size:  # BOS + 32 new tokens after the prefix
            limit = model.config.block_size
            checks.append({"model": str(path), "prefix_len": P, "skipped": f"over the model's {limit} positions"})
            print(json.dumps(checks[-1]), flush=True)
            continue
        prefixes = inputs.context["image"] if P == native else prefix_of_length(inputs.context["image"], P)
        for batch in (1, 8, 64, 256):
            n = min(len(prefixes), max(batch, 64))  # a few batches at small B, one full batch at large B
            rows = {name: [] for name in gens}
            for start in range(0, n, batch):
                for name, gen in gens.items():
                    tokens = gen.generate(prefixes[start: start + batch], max_new_tokens=32).tokens
                    # a batch stops once every row ended: EOS-pad to the full length so batches line up
                    rows[name].append(torch.nn.functional.pad(tokens, (0, 32 - tokens.shape[1]), value=tok.eos_id))
            a, b = torch.cat(rows["torch"]), torch.cat(rows["torch-triton"])
            differ = (a != b).any(dim=1).nonzero().flatten().tolist()
            check = {"model": str(path), "batch": batch, "samples": n, "prefix_len": P, "trained_prefix_len": native,
                     "dtype": artifacts.manifest.dtype, "tokens_equal": not differ,
                     "equal_fraction": float((a == b).float().mean()), "rows_that_differ": len(differ),
                     "first_caption": tok.decode(b[0].tolist())}
            if differ:
                row = differ[0]
                step = int((a[row] != b[row]).nonzero()[0])
                check["first_difference"] = {"row": row, "step": step, "torch": tok.decode(a[row].tolist()),
                                             "torch_triton": tok.decode(b[row].tolist()),
                                             **top2_gap(model, prefixes[row: row + 1], tok.bos_id, a[row, :step])}
            if P == native:
                texts = [tok.decode(r) for r in b.tolist()]
                check["triton_exact_match"] = sum(t == r for t, r in zip(texts, inputs.references)) / n
            checks.append(check)
            print(json.dumps(check), flush=True)
    return checks


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--artifacts", default=None, help="a trained model's artifacts: Triton vs torch tokens on it")
    ap.add_argument("--trained-only", action="store_true", help="only the trained-model check (needs --artifacts)")
    args = ap.parse_args()
    if args.trained_only and not args.artifacts:
        ap.error("--trained-only needs --artifacts")
    report = {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(DEV),
              "versions": versions(DEV)}
    if not args.trained_only:
        model = build_model("124m", torch.float16, DEV)
        tok = ByteTokenizer(bos_id=50256, eos_id=50256, pad_id=50256)
        report.update(model="GPT-2 124M shape, random weights, fp16, 64-patch prefix",
                      checks=graph_replay(model, tok), capture_fallback=capture_fallback(model, tok))
    if args.artifacts:
        report["trained_model"] = trained_model(Path(args.artifacts))
    print(f"wrote {write_result(args.out, report, 'trained-checks' if args.trained_only else 'gpu-checks')}")


if __name__ == "__main__":
    main()
