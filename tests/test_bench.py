import json
import random

import pytest

from helpers import require
from mmgpt.bench.decode import main, markdown_table, pair_rows


def test_smoke_report_is_well_formed(tmp_path):
    report = main(["--smoke", "--out", str(tmp_path), "--no-hf"])
    files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    assert any(f.endswith(".json") for f in files) and any(f.endswith(".md") for f in files)
    saved = json.loads(next(tmp_path.rglob("*.json")).read_text())
    assert saved["gpu"] == "cpu" and saved["versions"]["torch"] and saved["date"]
    assert saved["settings"]["prefixes"] == [0, 16, 64]
    assert {(r["impl"], r["batch"], r["prefix_len"]) for r in saved["rows"]} == {
        ("mmgpt-eager-cpu", b, p) for b in (1, 2) for p in (0, 16, 64)}
    for r in saved["rows"]:
        assert r["tokens_per_s"] > 0 and r["ttft_ms"] > 0 and r["weight_bytes"] > 0
        assert {"model", "dtype", "batch", "gb_per_s", "step_us", "kv_bytes_per_step"} <= set(r)
        if r["prefix_len"]:
            assert 0 < r["ideal_multimodal_over_text"] < 1  # the prefix only adds bytes
            assert r["multimodal_of_ideal"] == pytest.approx(
                r["multimodal_over_text"] / r["ideal_multimodal_over_text"], abs=2e-3)
        else:
            assert "multimodal_over_text" not in r
    longer = {r["batch"]: r["ideal_multimodal_over_text"] for r in saved["rows"] if r["prefix_len"] == 64}
    shorter = {r["batch"]: r["ideal_multimodal_over_text"] for r in saved["rows"] if r["prefix_len"] == 16}
    assert all(longer[b] < shorter[b] for b in longer)
    assert markdown_table(report).count("\n| smoke |") == len(report["rows"])


def test_pairing_looks_rows_up_by_key():
    def row(impl, batch, prefix_len, tok_s, kv):
        return {"model": "m", "dtype": "fp16", "batch": batch, "impl": impl, "prefix_len": prefix_len,
                "tokens_per_s": tok_s, "weight_bytes": 100, "kv_bytes_per_step": kv}
    rows = [row("mmgpt-graph", 1, 0, 10.0, 0), row("mmgpt-graph", 1, 64, 8.0, 25),
            row("mmgpt-graph+triton", 1, 0, 40.0, 0), row("mmgpt-graph+triton", 1, 64, 36.0, 25),
            row("mmgpt-graph+triton", 8, 64, 1.0, 25), {"model": "m", "dtype": "fp16", "batch": 8, "prefix_len": 0,
                                                       "impl": "mmgpt-graph+triton", "error": "OutOfResources"}]
    random.Random(0).shuffle(rows)
    by = {(r["impl"], r["batch"], r["prefix_len"]): r for r in pair_rows(rows)}
    image = by["mmgpt-graph+triton", 1, 64]
    assert image["multimodal_over_text"] == 0.9 and image["ideal_multimodal_over_text"] == 0.8
    assert image["multimodal_of_ideal"] == 1.125 and image["over_mmgpt_graph"] == 4.5
    assert by["mmgpt-graph", 1, 64]["multimodal_over_text"] == 0.8 and "over_mmgpt_graph" not in by["mmgpt-graph", 1, 0]
    assert "multimodal_over_text" not in by["mmgpt-graph+triton", 8, 64]  # its text row failed: nothing to pair


def test_merge_keeps_every_row_and_later_files_win(tmp_path):
    a = main(["--smoke", "--out", str(tmp_path / "a"), "--no-hf", "--tag", "a"])
    b = main(["--smoke", "--out", str(tmp_path / "b"), "--no-hf", "--tag", "b"])
    pa, pb = next((tmp_path / "a").rglob("*.json")), next((tmp_path / "b").rglob("*.json"))
    merged = main(["--merge", str(pa), str(pb), "--out", str(tmp_path / "m")])
    assert len(merged["rows"]) == len(a["rows"]) == len(b["rows"])
    assert {r["source"] for r in merged["rows"]} == {pb.name}
    assert [r["tokens_per_s"] for r in merged["rows"]] == [r["tokens_per_s"] for r in b["rows"]]
    assert merged["merged_from"] == [pa.name, pb.name]


def test_reports_record_their_commit_and_hf_tokens_equal_mmgpt(tmp_path):
    """Every results file names the commit that measured it; the Hugging Face copy of the timed weights generates
    mmgpt's greedy tokens, and a weight it cannot place is an error, not a silent skip."""
    require("transformers", "transformers is not installed (pip install -e .[dev])")
    import torch
    from mmgpt.bench.decode import build_model, hf_agrees, to_hf_gpt2
    from mmgpt.bench.results import git_commit
    main(["--smoke", "--out", str(tmp_path), "--no-hf"])
    saved = json.loads(next(tmp_path.rglob("*.json")).read_text())
    assert saved["commit"] == git_commit() and len(saved["commit"].split("+")[0]) == 40
    model = build_model("smoke", torch.float32, torch.device("cpu"), vocab=300)
    hf = to_hf_gpt2(model)
    assert hf_agrees(model, hf, torch.device("cpu"), prompt_len=4)["tokens_match"]
    with torch.no_grad():  # negative control: other weights in the HF copy are caught
        hf.transformer.h[0].mlp.c_fc.weight.mul_(-3.0)
    assert not hf_agrees(model, hf, torch.device("cpu"), prompt_len=4)["tokens_match"]
    model.transformer.add_module("unmapped", torch.nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match=r"no GPT2LMHeadModel place \['transformer.unmapped.bias'"):
        to_hf_gpt2(model)


def test_training_benchmark_times_the_module_step(tmp_path, monkeypatch):
    """The training benchmark's mmgpt rows run MultimodalGPTModule's own loss and optimizer (its parameter groups:
    no weight decay on biases and norms), every step; the HF row is its like and the ratio is recorded."""
    require("transformers", "transformers is not installed (pip install -e .[dev])")
    from mmgpt.bench import train as bench_train
    from mmgpt.training.module import MultimodalGPTModule
    calls, optimizers, real_loss, real_make = [], [], MultimodalGPTModule.step_loss, MultimodalGPTModule.make_optimizer
    monkeypatch.setattr(MultimodalGPTModule, "step_loss", lambda self, batch: calls.append(1) or real_loss(self, batch))
    monkeypatch.setattr(MultimodalGPTModule, "make_optimizer",
                        lambda self, *a, **k: optimizers.append(real_make(self, *a, **k)) or optimizers[-1])
    report = bench_train.main(["--smoke", "--out", str(tmp_path)])
    rows = {r["impl"]: r for r in report["rows"]}
    assert set(rows) == {"mmgpt-eager", "hf-eager"} and all("error" not in r for r in rows.values())
    assert len(calls) == 1 + 2  # warm-up + timed steps, all through the module
    (opt, sched), = optimizers
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0, 0.1, 0.0] and sched.last_epoch == 3
    assert rows["mmgpt-eager"]["over_hf_like"] == pytest.approx(
        rows["mmgpt-eager"]["tokens_per_s"] / rows["hf-eager"]["tokens_per_s"], rel=0.01)


def test_llama_shapes_and_their_hf_peer_on_the_same_weights():
    """The Llama-family rows time HF's own class (here LlamaForCausalLM) on mmgpt's weights: equal greedy tokens,
    and a changed weight is caught. The KV bytes per step count the KV heads only."""
    require("transformers", "transformers is not installed (pip install -e .[dev])")
    import torch
    from mmgpt.bench.decode import build_model, hf_agrees, kv_bytes_used, shape_fields, to_hf, weight_bytes
    assert shape_fields("smollm2_135m", 50257)["vocab_size"] == 49152  # the model's own vocabulary
    model = build_model("tiny_llama", torch.float32, torch.device("cpu"), vocab=300, block=64)
    c = model.config
    assert (c.family, c.n_kv_head, c.tie_weights) == ("llama", 2, True)
    assert weight_bytes(model) == 4 * model.num_params()  # no position table; the tied token table is the head
    assert kv_bytes_used(model, 1, 10, 1, torch.float32) == 2 * c.n_layer * 2 * c.head_dim * 10 * 4
    hf = to_hf(model)
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert hf_agrees(model, hf, torch.device("cpu"), prompt_len=4)["tokens_match"]
    with torch.no_grad():  # negative control
        hf.model.layers[0].mlp.up_proj.weight.mul_(-3.0)
    assert not hf_agrees(model, hf, torch.device("cpu"), prompt_len=4)["tokens_match"]


def test_smoke_decodes_a_new_modality_beside_text(tmp_path):
    """--decoded text codes: the same model shape decodes a new modality through its own tables; each of its rows
    carries its tok/s over text's at the same batch, context and impl."""
    report = main(["--smoke", "--out", str(tmp_path), "--no-hf", "--decoded", "text", "codes", "--batches", "1"])
    rows = {(r["decoded"], r["prefix_len"]): r for r in report["rows"]}
    assert set(rows) == {(d, p) for d in ("text", "codes") for p in (0, 16, 64)}
    for p in (0, 16, 64):
        new, text = rows[("codes", p)], rows[("text", p)]
        assert new["new_over_text"] == pytest.approx(new["tokens_per_s"] / text["tokens_per_s"], abs=2e-3)
        assert "new_over_text" not in text
    assert report["settings"]["decoded"] == ["text", "codes"] and "| codes |" in markdown_table(report)


def test_serving_smoke_report_is_well_formed(tmp_path):
    from mmgpt.bench.serving import main as serving_main, markdown_table as serving_table
    report = serving_main(["--smoke", "--out", str(tmp_path)])
    saved = json.loads(next(tmp_path.rglob("*serving-smoke.json")).read_text())
    assert saved["gpu"] == "cpu" and saved["commit"] and [r["rate_req_s"] for r in saved["load"]] == [50.0, 200.0]
    assert [t["prefill"] for t in saved["ttft"]] == ["eager"] and saved["ttft"][0]["ttft_ms"] > 0
    for row in saved["load"]:
        # the same greedy requests: in-flight batching and static batching produce the same tokens
        assert row["inflight"]["tokens"] == row["static"]["tokens"] > 0
        for kind in ("inflight", "static"):
            m = row[kind]
            assert m["ttft_p99_ms"] >= m["ttft_p50_ms"] > 0 and m["itl_p99_ms"] >= m["itl_p50_ms"] > 0
    cache = saved["prefix_cache"]
    # 2 images, 8 requests each: at most 14 hits (fewer where copies of an image join in the same step)
    assert 8 <= cache["on"]["prefix_cache_hits"] <= 14 and cache["off"]["prefix_cache_hits"] == 0
    assert cache["on"]["tokens"] == cache["off"]["tokens"]  # a hit never changes the tokens
    assert "prefix cache, smoke" in serving_table(report)


def test_http_overhead_report(exported, tmp_path):
    from mmgpt.bench.http_overhead import main as http_main, markdown_table as http_table
    report = http_main(["--artifacts", str(exported), "--requests", "3", "--max-tokens", "4", "--out", str(tmp_path)])
    saved = json.loads(next(tmp_path.rglob("*http-overhead.json")).read_text())
    assert saved["settings"]["backend"] == "onnxruntime" and saved["commit"]
    lat = saved["latency"]
    for name in ("in_process_request", "http_request", "in_process_first_token", "http_first_token"):
        assert lat[name]["p99_ms"] >= lat[name]["p50_ms"] > 0  # separate runs: no order between the kinds
    assert saved["http_overhead_request_p50_ms"] == pytest.approx(
        lat["http_request"]["p50_ms"] - lat["in_process_request"]["p50_ms"])
    assert "HTTP overhead (p50)" in http_table(report)
