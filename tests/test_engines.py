"""Engines: TensorRT-RTX builds both strategies on this CPU; their I/O and profiles match the ONNX contract."""
import json
import shutil

import pytest
import torch

from mmgpt.engines.build import build_engines, profile_shapes
from mmgpt.engines.inspection import format_inspection, inspect_engine
from mmgpt.engines.session import EngineError, TensorRTBackend, cannot_run_message
from mmgpt.contract.artifacts import Artifacts

trt = pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed (pip install tensorrt-rtx-cu13)")

ENGINE_CFG = {"runtime": "tensorrt_rtx", "profiles": {"batch": [1, 2, 8], "prompt": [1, 4, 32],
                                                      "capacity": [64, 128, 1024]},
              "workspace_mib": 1024, "optimization_level": 3, "compute_capability": "SM89", "timing_cache": None}


@pytest.fixture(scope="module")
def built(exported, tmp_path_factory):
    path = tmp_path_factory.mktemp("engines") / "digits"
    shutil.copytree(exported, path)
    artifacts = Artifacts(path)
    entries = {s: build_engines(artifacts, {**ENGINE_CFG, "strategy": s}) for s in ("two_engines", "shared")}
    return Artifacts(path), entries


def test_shared_engine_is_smaller_than_two_engines(built):
    _, entries = built
    two, shared = entries["two_engines"]["total_bytes"], entries["shared"]["total_bytes"]
    print(f"\nengine sizes: two_engines {two / 2**20:.2f} MiB "
          f"(prefill {entries['two_engines']['engines']['prefill']['bytes'] / 2**20:.2f} + decode "
          f"{entries['two_engines']['engines']['decode']['bytes'] / 2**20:.2f}), shared {shared / 2**20:.2f} MiB")
    assert shared < two


def test_engine_io_matches_onnx_contract(built):
    artifacts, entries = built
    graphs = artifacts.meta["graphs"]
    for strategy, engine_names in (("two_engines", {"prefill": "prefill", "decode": "decode"}),
                                   ("shared", {"shared": "context_generation"})):
        for engine, graph in engine_names.items():
            io = entries[strategy]["engines"][engine]["io"]
            contract = {**graphs[graph]["inputs"], **graphs[graph]["outputs"]}
            assert list(io) == list(contract)
            for name, t in io.items():
                want = {"float32": "float", "int64": "int64"}[contract[name]["dtype"]]
                assert t["dtype"] == want, name
                # symbolic ONNX dims are dynamic (-1) in the network; fixed dims stay as they are
                assert t["shape"] == [-1 if isinstance(d, str) else d for d in contract[name]["shape"]], name


def test_profiles_cover_both_flows(built):
    artifacts, entries = built
    shared = entries["shared"]["engines"]["shared"]["profiles"]
    P, L = artifacts.meta["prefix_len"], artifacts.meta["model_config"]["n_layer"]
    assert list(shared) == ["context", "generation"]
    assert shared["context"]["past_key_values.0.key"] == [[1, 4, 0, 32], [2, 4, 0, 32], [8, 4, 0, 32]]
    assert shared["context"]["prefix"][2] == [8, P, 16]
    assert shared["generation"]["prefix"] == [[1, 0, 16], [2, 0, 16], [8, 0, 16]]
    assert shared["generation"]["input_ids"] == [[1, 1], [2, 1], [8, 1]]
    # capacity clipped to the model's 128 positions
    assert shared["generation"][f"past_key_values.{L - 1}.value"][2] == [8, 4, 128, 32]
    decode = entries["two_engines"]["engines"]["decode"]["profiles"]["generation"]
    assert decode["past_key_values.0.key"][0] == [1, 4, 64, 32]


def test_inspection_and_model_json(built):
    artifacts, _ = built
    info = inspect_engine(artifacts.path / "shared.engine")
    assert info["bytes"] == (artifacts.path / "shared.engine").stat().st_size
    assert set(info["profiles"]) == {"context", "generation"}
    assert "past_key_values.0.key" in format_inspection(info)
    meta = json.loads((artifacts.path / "model.json").read_text())
    assert set(meta["engines"]) == {"two_engines", "shared"}
    assert meta["engines"]["shared"]["settings"]["compute_capability"] == "SM89"


def test_profile_outside_export_limits_is_refused(built):
    artifacts, _ = built
    with pytest.raises(ValueError, match=r"profiles.batch=\[1, 1, 64\] must lie within \[1, 16\]"):
        profile_shapes(artifacts.meta, {**ENGINE_CFG, "profiles": {**ENGINE_CFG["profiles"], "batch": [1, 1, 64]}})


def test_engine_from_other_weights_is_refused(built):
    artifacts, _ = built
    record = artifacts.path / "decode.engine.json"
    saved = record.read_text()
    record.write_text(json.dumps({**json.loads(saved), "weights_sha256": "0" * 64}))
    try:
        with pytest.raises(EngineError, match="built from other weights"):
            TensorRTBackend(artifacts, "two_engines")
    finally:
        record.write_text(saved)


def test_cannot_run_message_names_the_alternative():
    msg = cannot_run_message("tensorrt_rtx", "unsupported SM")
    assert "tensorrt-cu13" in msg and "backend=torch" in msg


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="no CUDA GPU on this machine: TensorRT-RTX engines build here but cannot execute")
@pytest.mark.parametrize("strategy", ["two_engines", "shared"])
def test_engine_execution_matches_torch(built, trained, strategy):
    from mmgpt.checkpoint import load_checkpoint
    from mmgpt.runtime.backends.torch_model import TorchBackend
    from mmgpt.runtime.generator import Generator
    artifacts, _ = built
    try:
        backend = TensorRTBackend(artifacts, strategy)
    except EngineError as e:  # e.g. TensorRT-RTX on an H100: the message names what to use instead
        pytest.skip(str(e))
    loaded = load_checkpoint(trained["last_ckpt"])
    prefix = torch.rand(3, 8, 16)
    prompts = [[256], [256, 116], [256, 111, 110]]
    runs = [Generator(b, loaded.tokenizer, max_positions=128).generate(prefix, prompts, max_new_tokens=24)
            for b in (backend, TorchBackend(loaded.model.cuda()))]
    assert torch.equal(runs[0].tokens, runs[1].tokens)
