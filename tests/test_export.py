"""Export: the graph contract, symbolic dims, shared weights, parity, and never a half-written directory."""
import json

import onnx
import pytest
import torch

from helpers import compose_config
from mmgpt.checkpoint import CheckpointError
from mmgpt.contract.artifacts import Artifacts
from mmgpt.export.onnx_graphs import OPSET, io_dims
from mmgpt.export.pipeline import export


def test_artifacts_follow_the_contract(exported):
    a = Artifacts.open(exported)
    m = a.manifest
    L, H, D = m.config.n_layer, m.config.n_head, 32
    prefill = onnx.load(a.graph_path("prefill"), load_external_data=False)
    decode = onnx.load(a.graph_path("decode"), load_external_data=False)
    assert prefill.opset_import[0].version == OPSET
    assert [i.name for i in prefill.graph.input] == ["image_features", "input_ids", "input_lengths"]
    assert [o.name for o in prefill.graph.output][:3] == ["logits", "present.0.key", "present.0.value"]
    assert [i.name for i in decode.graph.input][:4] == ["input_ids", "position_ids", "past_key_values.0.key",
                                                        "past_key_values.0.value"]
    dims = io_dims(prefill)
    assert dims["image_features"] == ["batch", "image_len", 16]
    assert dims["input_ids"] == ["batch", "prompt_len"]
    assert dims["present.0.key"][:2] == ["batch", H] and isinstance(dims["present.0.key"][2], str)
    dims = io_dims(decode)
    assert dims[f"past_key_values.{L - 1}.value"] == ["batch", H, "cache_len", D]
    assert dims["present.0.key"] == ["batch", H, 1, D]
    assert m.graphs["decode"].inputs["position_ids"]["dtype"] == "int64"
    assert m.graphs["decode"].outputs["present.0.key"]["shape"] == ["batch", H, 1, D]  # the new slot only
    assert len(m.weights.sha256_tree) == 64 and m.tokenizer["type"] == "byte"


def test_weights_are_stored_once(exported):
    m = Artifacts.open(exported).manifest
    sizes = m.stats["sizes"]
    assert (exported / "weights.bin").stat().st_size >= sizes["weights_bytes"]
    # the PyTorch backends' index points into the graphs' copy (nn.Linear weights as their transposes): little
    # beyond the graphs' weights is stored for them
    assert (exported / "weights.bin").stat().st_size < 1.05 * sizes["weights_bytes"]
    assert any(loc.transposed for loc in m.weights.tensors.values())
    assert sizes["bytes_if_not_shared"] >= 2.9 * sizes["weights_bytes"]  # three graphs, one copy
    for g in ("prefill", "decode"):
        assert sizes[f"{g}.onnx"] < 200_000  # graph structure only: the weights live in weights.bin


def test_parity_written_and_held(exported):
    parity = json.loads((exported / "parity.json").read_text())
    assert parity["passed"] and parity["bound_held"]
    assert parity["worst"] <= 1e-4
    shapes = {(c["graph"], c["shape"]["batch"]) for c in parity["cases"]}
    assert {("prefill", 1), ("prefill", 3), ("decode", 1), ("decode", 3)} <= shapes
    assert parity["chained"]["tokens_match"] and parity["chained"]["decode_steps"] == 32
    assert len(set(parity["chained"]["prompt_lengths"])) == 3  # ragged


@pytest.mark.slow
def test_fp16_export_parity(trained, tmp_path):
    path = export(compose_config("export", [f"ckpt={trained['last_ckpt']}", f"output_root={tmp_path}", "name=h",
                                            "dtype=fp16", "engine=none"]))
    parity = json.loads((path / "parity.json").read_text())
    assert parity["dtype"] == "float16" and parity["bound_held"], parity["worst"]
    model = onnx.load(path / "decode.onnx", load_external_data=False)
    assert model.graph.input[2].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16


def test_missing_and_foreign_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        export(compose_config("export", [f"ckpt={tmp_path}/nope.ckpt", f"output_root={tmp_path}", "engine=none"]))
    torch.save({"state_dict": {"layer.weight": torch.zeros(2)}}, tmp_path / "foreign.ckpt")
    with pytest.raises(CheckpointError, match="not an mmgpt checkpoint"):
        export(compose_config("export", [f"ckpt={tmp_path}/foreign.ckpt", f"output_root={tmp_path}", "engine=none"]))
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_interrupted_export_leaves_nothing(trained, tmp_path, monkeypatch):
    import mmgpt.export.pipeline as pipeline

    def fail(*args, **kwargs):
        raise KeyboardInterrupt("simulated interruption after the graphs were written")
    monkeypatch.setattr(pipeline, "run_parity", fail)
    with pytest.raises(KeyboardInterrupt):
        export(compose_config("export", [f"ckpt={trained['last_ckpt']}", f"output_root={tmp_path}", "name=x",
                                         "engine=none"]))
    assert list(tmp_path.iterdir()) == []  # neither artifacts/x nor its staging directory


def test_failed_reexport_keeps_the_previous_artifacts(exported, trained, monkeypatch):
    import mmgpt.export.pipeline as pipeline
    before = (exported / "model.json").read_text()
    monkeypatch.setattr(pipeline, "run_parity", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        export(compose_config("export", [f"ckpt={trained['last_ckpt']}", f"output_root={exported.parent}",
                                         f"name={exported.name}", "engine=none"]))
    assert (exported / "model.json").read_text() == before
    assert sorted(p.name for p in exported.parent.iterdir()) == [exported.name]


@pytest.mark.parametrize("edit, match", [
    (lambda meta: meta.update(format=99), r"format 99, this mmgpt reads format 3: it was written by a newer mmgpt"),
    (lambda meta: meta.pop("format"), r"format 1, .* an older mmgpt. Use the mmgpt version that wrote it, or re-train"),
    (lambda meta: meta.pop("schedule"), r"'mmgpt' entry is damaged \(missing field 'mmgpt.schedule'\)"),
    (lambda meta: meta.update(context_lens={"image": "8"}), r"'mmgpt.context_lens.image' must be an integer"),
])
def test_checkpoint_meta_is_checked_before_export(trained, tmp_path, edit, match):
    """The checkpoint's mmgpt entry is read through its type: another format or a damaged field is refused, with
    what to do, before anything is traced; the untouched checkpoint reads (negative control)."""
    from mmgpt.checkpoint import read_checkpoint
    ckpt = torch.load(trained["last_ckpt"], map_location="cpu", weights_only=True)
    assert read_checkpoint(trained["last_ckpt"])[1].format == 3
    edit(ckpt["mmgpt"])
    torch.save(ckpt, tmp_path / "edited.ckpt")
    with pytest.raises(CheckpointError, match=match):
        export(compose_config("export", [f"ckpt={tmp_path}/edited.ckpt", f"output_root={tmp_path}", "engine=none"]))
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_fp16_parity_holds_each_output_to_its_own_scale():
    """A KV error of 0.5 on values near 1 fails fp16 parity even beside logits near 30 (relative to the largest
    logit it would read 0.017 < 0.02); the same logits error alone passes (0.3 of 30: 0.01)."""
    from mmgpt.export.parity import TOLERANCE, output_error
    logits, key = torch.full((2, 8), 30.0), torch.ones(2, 4, 3, 8)
    names = ["logits", "present.0.key"]
    bad_kv = output_error(names, [logits, key], [logits, key + 0.5], "float16")
    assert bad_kv["worst_output"] == "present.0.key" and bad_kv["error"] == 0.5 > TOLERANCE["float16"]
    logits_off = output_error(names, [logits, key], [logits + 0.3, key], "float16")
    assert logits_off["worst_output"] == "logits" and logits_off["error"] <= TOLERANCE["float16"]
    assert output_error(names, [logits, key], [logits, key + 2e-4], "float32")["error"] > TOLERANCE["float32"]
