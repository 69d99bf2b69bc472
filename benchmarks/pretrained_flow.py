"""The pretrained-GPT-2 flow on a GPU, end to end, through the commands' own functions:

    python benchmarks/pretrained_flow.py --out DIR [--shape 124m] [--prefix 576] [--steps 300]

A GPT-2-shaped Hugging Face directory (random weights: no hub here; a byte-level BPE tokenizer trained on the
captions) -> `+experiment=gpt2_features` with the language model frozen -> export (fp16, parity) -> decode on
torch-triton. Features are CLIP-like vectors (P of them per sample, F = 1024). Prints and writes a JSON of the
step time, exact match, export time and decode speed. `--shape tiny` runs the same on a CPU in a minute.
"""
import argparse
import datetime
import json
import time
from pathlib import Path

import numpy as np
import torch

from mmgpt.bench.results import write_result

SHAPES = {"124m": dict(n_layer=12, n_head=12, n_embd=768), "tiny": dict(n_layer=2, n_head=2, n_embd=64)}
WORDS = ["red", "green", "blue", "square", "circle", "small", "large", "left", "right", "cat", "dog", "car"]


def make_inputs(root: Path, shape: str, prefix: int, samples: int, features: int):
    """A captioned feature set whose caption is a function of the features (so it can be learned), and a GPT-2
    directory with its tokenizer."""
    import transformers
    from tokenizers import ByteLevelBPETokenizer
    rng = np.random.default_rng(0)
    labels = rng.integers(0, len(WORDS), (samples, 3))
    centers = rng.normal(size=(len(WORDS), features)).astype(np.float32)
    feats = rng.normal(scale=0.5, size=(samples, prefix, features)).astype(np.float32)
    for i, row in enumerate(labels):  # each third of the prefix carries one word's center
        for j, w in enumerate(row):
            feats[i, j * prefix // 3:(j + 1) * prefix // 3] += centers[w]
    captions = [" ".join(WORDS[w] for w in row) for row in labels]
    np.savez(root / "features.npz", features=feats, texts=np.array(captions))
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(captions * 4 + WORDS, vocab_size=400, min_frequency=1, show_progress=False)
    bpe.add_special_tokens(["<|endoftext|>"])
    gpt2 = root / "gpt2"
    gpt2.mkdir(exist_ok=True)
    bpe.save(str(gpt2 / "tokenizer.json"))
    eot = bpe.token_to_id("<|endoftext|>")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50257, n_positions=1024, bos_token_id=eot, eos_token_id=eot,
                                     **SHAPES[shape])
    transformers.GPT2LMHeadModel(config).save_pretrained(gpt2)
    return gpt2, root / "features.npz"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shape", default="124m", choices=list(SHAPES))
    ap.add_argument("--prefix", type=int, default=576)
    ap.add_argument("--features", type=int, default=1024)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--work", default="/tmp/pretrained-flow")
    args = ap.parse_args()
    from hydra import compose, initialize_config_dir

    from mmgpt.export.pipeline import export
    from mmgpt.inference import infer
    from mmgpt.training import train
    root = Path(args.work)
    root.mkdir(parents=True, exist_ok=True)
    gpt2, data = make_inputs(root, args.shape, args.prefix, args.samples, args.features)
    gpu = torch.cuda.is_available()
    conf = str(Path(__file__).resolve().parents[1] / "conf")
    report = {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name() if gpu else "cpu",
              "shape": args.shape, "prefix_len": args.prefix, "feature_dim": args.features, "steps": args.steps}
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        t0 = time.perf_counter()
        result = train(compose("train", [
            "+experiment=gpt2_features", f"model.init_from={gpt2}", f"data.path={data}", "logger=csv",
            f"paths.output_dir={root / 'run'}", f"trainer.max_steps={args.steps}", "trainer.val_check_interval=1000",
            "trainer.enable_progress_bar=false", "data.batch_size=16", "module.max_new_tokens=8",
            *([] if gpu else ["trainer.accelerator=cpu", "trainer.precision=32-true"])]))
        report["train"] = {"seconds": round(time.perf_counter() - t0, 1), "exact_match": result["metrics"].get(
            "val/exact_match"), "throughput": result["throughput"]}
        t0 = time.perf_counter()
        artifacts = export(compose("export", [f"ckpt={result['last_ckpt']}", f"output_root={root / 'artifacts'}",
                                              "name=gpt2", "dtype=fp16" if gpu else "dtype=fp32", "engine=none"]))
        report["export_seconds"] = round(time.perf_counter() - t0, 1)
        report["parity"] = {k: v for k, v in json.loads((artifacts / "parity.json").read_text()).items()
                            if k in ("worst", "passed", "dtype")}
        for backend in (("torch-triton", "torch") if gpu else ("onnxruntime",)):
            r = infer(compose("infer", [f"artifacts={artifacts}", f"backend={backend}", f"input={data}",
                                        "limit=128", "max_new_tokens=8", "show=2"]))
            report[f"infer_{backend}"] = {k: r[k] for k in ("exact_match", "decode_tokens_per_s",
                                                           "time_to_first_token_ms", "batch_size")}
    print(json.dumps(report, indent=1))
    print(f"wrote {write_result(args.out, report, 'pretrained-flow')}")


if __name__ == "__main__":
    main()
