"""Engines: TensorRT-RTX builds both strategies on this CPU from an artifacts directory alone (no checkpoint, no
re-tracing), with the stream-capture flag, and the one-masked-past-slot variant; their I/O and profiles match the
graph declarations."""
import dataclasses
import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch

from helpers import ROOT, compose_config, require
from mmgpt.contract.artifacts import Artifacts
from mmgpt.contract.engines import EngineConfig
from mmgpt.contract.graphs import declare_graphs, past_names
from mmgpt.engines.build import build_engines, check_engine_config, profile_sizes
from mmgpt.engines.inspection import format_inspection, inspect_engine
from mmgpt.contract.manifest import Manifest
from mmgpt.engines.trt import EngineError
from mmgpt.errors import UserError
from mmgpt.export.pipeline import export
from mmgpt.runtime.backends.tensorrt_engines import TensorRTBackend, cannot_run_message

trt = require("tensorrt_rtx", "TensorRT-RTX is not installed (pip install tensorrt-rtx-cu13)")

PROFILES = {"batch": [1, 2, 8], "prompt": [1, 4, 32], "capacity": [64, 128, 1024]}
ENGINE_CFG = EngineConfig.defaults(runtime="tensorrt_rtx", compute_capability="SM89", profiles=PROFILES)


@pytest.fixture(scope="module")
def built(exported, tmp_path_factory):
    """Both strategies built by the user's command, from a copy of the artifacts whose checkpoint is unknown."""
    path = tmp_path_factory.mktemp("engines") / "digits"
    shutil.copytree(exported, path)
    for strategy in ("two_engines", "shared"):
        export(compose_config("export", [f"artifacts={path}", "engine=tensorrt_rtx", f"engine.strategy={strategy}",
                                         "engine.compute_capability=SM89", "ckpt=/nonexistent/last.ckpt",
                                         "engine.profiles.batch=[1,2,8]", "engine.profiles.prompt=[1,4,32]",
                                         "engine.profiles.capacity=[64,128,1024]"]))
    artifacts = Artifacts.open(path)
    return artifacts, artifacts.manifest.engines


def test_shared_engine_is_smaller_than_two_engines(built):
    _, entries = built
    two, shared = entries["two_engines"].total_bytes, entries["shared"].total_bytes
    print(f"\nengine sizes: two_engines {two / 2**20:.2f} MiB, shared {shared / 2**20:.2f} MiB; builder weights "
          f"{entries['two_engines'].builder_weights_bytes} vs {entries['shared'].builder_weights_bytes} bytes")
    assert shared < two
    # the builder's own weights count: two engines hold two copies, the shared engine one
    w2, w1 = entries["two_engines"].builder_weights_bytes, entries["shared"].builder_weights_bytes
    assert w2 and w1 and w2 >= 1.9 * w1


@pytest.mark.slow
def test_new_modality_graphs_build_in_both_strategies_with_one_weight_copy(drawn, tmp_path):
    """digits_draw's graphs (a ragged text context in, the drawn image's own table and head in the decode flow)
    build with TensorRT-RTX in both strategies; the shared engine's builder-reported weights are one copy."""
    path = tmp_path / "draw"
    shutil.copytree(drawn, path)
    entries = {s: build_engines(Artifacts.open(path), ENGINE_CFG.replace(strategy=s))
               for s in ("two_engines", "shared")}
    shared = entries["shared"].engines["shared"]
    assert shared.profiles["context"]["text_ids"][2] == [8, 96]  # max batch, the context's exported limit
    assert shared.profiles["generation"]["text_ids"] == [[1, 0], [2, 0], [8, 0]]
    assert shared.io["logits"]["shape"] == [-1, 65]  # the drawn modality's vocabulary
    w2, w1 = entries["two_engines"].builder_weights_bytes, entries["shared"].builder_weights_bytes
    assert w2 and w1 and w2 >= 1.9 * w1


def test_engine_io_matches_graph_declarations(built):
    artifacts, entries = built
    graphs = declare_graphs(artifacts.manifest.dims)
    for strategy in ("two_engines", "shared"):
        for engine in entries[strategy].engines.values():
            graph = graphs[engine.source]
            assert list(engine.io) == graph.input_names + graph.output_names
            for t in (*graph.inputs, *graph.outputs):
                assert engine.io[t.name]["dtype"] == {"float32": "float", "int64": "int64"}[
                    t.dtype_name(artifacts.manifest.dtype)]
                # symbolic dims are dynamic (-1) in the network; fixed dims stay as they are
                assert engine.io[t.name]["shape"] == [-1 if isinstance(d, str) else d for d in t.dims], t.name


def test_profiles_cover_both_flows(built):
    artifacts, entries = built
    shared = entries["shared"].engines["shared"].profiles
    m = artifacts.manifest
    P, L = m.context_lens["image"], m.config.n_layer
    assert list(shared) == ["context", "generation"]
    assert shared["context"]["past_key_values.0.key"] == [[1, 4, 0, 32], [2, 4, 0, 32], [8, 4, 0, 32]]
    assert shared["context"]["image_features"][2] == [8, P, 16]
    assert shared["generation"]["image_features"] == [[1, 0, 16], [2, 0, 16], [8, 0, 16]]
    assert shared["generation"]["input_ids"] == [[1, 1], [2, 1], [8, 1]]
    # capacity clipped to the model's 128 positions
    assert shared["generation"][f"past_key_values.{L - 1}.value"][2] == [8, 4, 128, 32]
    decode = entries["two_engines"].engines["decode"].profiles["generation"]
    assert decode["past_key_values.0.key"][0] == [1, 4, 64, 32]
    assert entries["shared"].context_past_slots == 0  # RTX builds the empty past; the fallback is not needed


def test_inspection_names_profiles_like_the_build_record(built):
    artifacts, _ = built
    info = inspect_engine(artifacts.path / "shared.engine")
    assert info["bytes"] == (artifacts.path / "shared.engine").stat().st_size
    assert list(info["profiles"]) == ["context", "generation"]  # the loaded-engine path uses the same names
    text = format_inspection(info)
    assert "past_key_values.0.key" in text and "profile generation:" in text
    assert artifacts.manifest.engines["shared"].config.compute_capability == "SM89"
    moved = artifacts.path.parent / "elsewhere"  # without its model.json beside it, an engine has no record
    moved.mkdir(exist_ok=True)
    shutil.copy(artifacts.path / "shared.engine", moved / "shared.engine")
    with pytest.raises(UserError, match="records no such engine"):
        inspect_engine(moved / "shared.engine")


def test_build_records_the_capture_flag_and_checks_options_first(built, tmp_path):
    artifacts, _ = built
    record = Manifest.read(artifacts.path).engines["shared"]  # the record as written to model.json, read back
    assert record.target == "SM89" and record.runtime == "tensorrt_rtx"
    assert record.config == ENGINE_CFG.replace(strategy="shared") and record.config.profiles.batch == [1, 2, 8]
    check_engine_config(ENGINE_CFG)  # negative control: the good config passes
    with pytest.raises(UserError, match="engine.compute_capability='SM999'"):
        check_engine_config(ENGINE_CFG.replace(compute_capability="SM999"))
    good = ENGINE_CFG.to_dict()
    for bad, match in (({"strategy": "bogus"}, "engine.strategy='bogus'"),
                       ({"profiles": {**PROFILES, "batch": [4, 2, 8]}}, r"min <= opt <= max"),
                       ({"context_past_slots": 3}, "context_past_slots"),
                       ({"tf32": "no"}, "'engine.tf32' must be true or false"),
                       ({"workspace_mib": None}, "'engine.workspace_mib' must be an integer")):
        with pytest.raises(UserError, match=match):
            EngineConfig.from_dict({**good, **bad})
    with pytest.raises(UserError, match="missing field 'engine.optimization_level'.*conf/engine/auto.yaml"):
        EngineConfig.from_dict({k: v for k, v in good.items() if k != "optimization_level"})


def test_one_masked_past_slot_variant_builds_and_keeps_parity(built, tmp_path):
    """The fallback for runtimes that refuse a reduction over an empty past: one slot, masked (position 0 <= it),
    computes what the empty past does (ONNX Runtime on the same graph), and TensorRT-RTX builds it."""
    artifacts, _ = built
    m = artifacts.manifest
    sess = ort.InferenceSession(str(artifacts.graph_path("context_generation")), providers=["CPUExecutionProvider"])
    g = np.random.default_rng(0)
    B, P, T, H, D = 2, m.context_lens["image"], 5, m.config.n_head, m.dims.head_dim
    feed = {"image_features": g.random((B, P, m.dims.context[0].dim), dtype=np.float32),
            "input_ids": g.integers(0, 256, (B, T)), "input_lengths": np.array([T, 3]),
            "position_ids": np.zeros((B, 1), dtype=np.int64)}
    empty = sess.run(None, {**feed, **{n: np.zeros((B, H, 0, D), np.float32) for n in past_names(m.config.n_layer)}})
    masked = sess.run(None, {**feed, **{n: np.zeros((B, H, 1, D), np.float32) for n in past_names(m.config.n_layer)}})
    assert max(float(np.abs(a - b).max()) for a, b in zip(empty, masked)) <= 1e-5  # fp32 summation order
    copy = tmp_path / "digits"
    shutil.copytree(artifacts.path, copy)
    one = Artifacts.open(copy)
    entry = build_engines(one, ENGINE_CFG.replace(strategy="shared", context_past_slots=1))
    assert entry.context_past_slots == 1
    assert entry.engines["shared"].profiles["context"]["past_key_values.0.key"][0] == [1, 4, 1, 32]
    sizes = profile_sizes(one, ENGINE_CFG, context_past_slots=1)
    assert sizes["context"]["cache_len"] == (1, 1, 1)


def test_engine_from_other_weights_or_replaced_is_refused(built):
    artifacts, _ = built
    build = artifacts.manifest.engines["two_engines"]
    other = dataclasses.replace(build, weights_sha256_tree="0" * 64)
    with pytest.raises(EngineError, match="built from other weights"):
        TensorRTBackend(Artifacts(artifacts.path, dataclasses.replace(artifacts.manifest,
                                                                      engines={"two_engines": other})),
                        "two_engines", device="cpu", trt=trt)
    resized = dataclasses.replace(build, engines={**build.engines, "decode": dataclasses.replace(
        build.engines["decode"], bytes=build.engines["decode"].bytes + 1)})
    with pytest.raises(EngineError, match="the file was replaced after the build"):
        TensorRTBackend(Artifacts(artifacts.path, dataclasses.replace(artifacts.manifest,
                                                                      engines={"two_engines": resized})),
                        "two_engines", device="cpu", trt=trt)


def test_cannot_run_message_names_the_alternative():
    msg = cannot_run_message("tensorrt_rtx", "unsupported SM")
    assert "tensorrt-cu13" in msg and "backend=torch-triton" in msg and "unsupported SM" in msg


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: engines build here but cannot execute")
@pytest.mark.parametrize("strategy", ["two_engines", "shared"])
def test_engine_execution_matches_torch(built, strategy):
    from mmgpt.runtime.backends.torch_model import TorchBackend
    from mmgpt.runtime.generator import Generator
    artifacts, _ = built
    try:
        backend = TensorRTBackend(artifacts, strategy)
    except EngineError as e:
        if torch.cuda.get_device_capability() >= (9, 0) and "TensorRT-RTX cannot run" in str(e):
            pytest.skip("TensorRT-RTX does not run on compute capability 9.0+ (H100 / H200)")
        raise
    prefix = torch.rand(3, artifacts.manifest.context_lens["image"], 16)
    prompts = [[256], [256, 116], [256, 111, 110]]
    runs = [Generator(b, artifacts.tokenizer, max_positions=128).generate(prefix, prompts, max_new_tokens=24)
            for b in (backend, TorchBackend(artifacts.load_model("cuda")))]
    assert torch.equal(runs[0].tokens, runs[1].tokens)


def test_trt_first_run_smoke_builds_and_inspects_then_says_why_it_stops(exported, tmp_path):
    """The first-run checklist's CPU part, as CI runs it; on a machine without a usable GPU it must stop with the
    reason written down, never claim success."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("trt_first_run", ROOT / "benchmarks" / "trt_first_run.py")
    first_run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(first_run)
    copy = tmp_path / "digits"
    shutil.copytree(exported, copy)
    report = first_run.main(["--artifacts", str(copy), "--runtime", "tensorrt_rtx", "--compute-capability", "SM89",
                             "--out", str(tmp_path / "out"), "--smoke"])
    steps = {s["step"]: s for s in report["steps"]}
    assert all(s["ok"] for s in steps.values()) and report["status"].startswith("smoke")
    assert steps["build"]["shared"]["builder_weights_bytes"] < steps["build"]["two_engines"]["builder_weights_bytes"]
    assert set(steps["inspect"]["engines"]) == {"prefill", "decode", "shared"}
    saved = json.loads(next((tmp_path / "out").rglob("*-trt-first-run.json")).read_text())
    assert saved["status"] == report["status"]
    if not torch.cuda.is_available():  # the full run stops at loading, with the reason
        report = first_run.main(["--artifacts", str(copy), "--runtime", "tensorrt_rtx", "--compute-capability",
                                 "SM89", "--out", str(tmp_path / "out")])
        assert report["status"] == "stopped at load two_engines"
        assert "needs a CUDA GPU" in report["steps"][-1]["error"]
