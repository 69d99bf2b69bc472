"""The structure the code promises: imports flow one way (model -> contract -> engines -> backends -> generator ->
commands), serving needs no training stack, and an artifacts directory is all a backend needs."""
import ast
import shutil
import subprocess
import sys
import tomllib

import pytest
import torch

from helpers import ROOT, compose_config

# Lowest stage first; a module may import from its own stage or below, never above.
STAGES = [
    ("mmgpt.errors", "mmgpt.contract.typed", "mmgpt.contract.checkpoint", "mmgpt.files", "mmgpt.model",
     "mmgpt.tokenizer", "mmgpt.kernels", "mmgpt.hf"),
    ("mmgpt.data", "mmgpt.checkpoint"),
    ("mmgpt.contract",),
    ("mmgpt.engines",),
    ("mmgpt.runtime.backends",),
    ("mmgpt.runtime",),
    ("mmgpt.throughput", "mmgpt.training.schedule", "mmgpt.training.callbacks"),
    ("mmgpt.training.module",),
    ("mmgpt.training", "mmgpt.training.run", "mmgpt.export", "mmgpt.inference", "mmgpt.bench", "mmgpt.cli",
     "mmgpt.strict_config", "mmgpt.serving"),
]


def stage_of(module: str) -> int:
    best = None
    for i, prefixes in enumerate(STAGES):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    assert best is not None, f"{module} is in no stage: add it to STAGES"
    return best[0]


def mmgpt_imports(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mmgpt"):
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("mmgpt"))


def test_imports_flow_one_way():
    wrong = []
    for path in sorted((ROOT / "mmgpt").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for imported in mmgpt_imports(path):
            if stage_of(imported) > stage_of(module):
                wrong.append(f"{module} (stage {stage_of(module)}) imports {imported} (stage {stage_of(imported)})")
    assert not wrong, "\n".join(wrong)


def test_serving_imports_no_training_stack():
    code = ("import sys, mmgpt.inference, mmgpt.runtime.backends.torch_model, mmgpt.runtime.backends.onnx_runtime, "
            "mmgpt.runtime.backends.tensorrt_engines, mmgpt.engines.build, mmgpt.hf, mmgpt.serving.app, "
            "mmgpt.serving.deployment; "
            "print(sorted(m for m in ('lightning', 'wandb', 'sklearn', 'onnx_graphsurgeon', 'onnxscript') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"])
    assert not any(name in base for name in ("lightning", "wandb", "scikit-learn", "graphsurgeon"))
    assert {"train", "export"} <= set(project["optional-dependencies"])


def test_artifacts_copied_elsewhere_serve_on_every_backend_without_the_checkpoint(exported, tmp_path, monkeypatch):
    from mmgpt.inference import infer

    def run(path, backend):  # a few samples: torch-triton runs in Triton's interpreter here
        return infer(compose_config("infer", [f"artifacts={path}", f"backend={backend}", "show=0", "limit=3",
                                              "max_new_tokens=6"]))
    before = run(exported, "onnxruntime")["texts"]
    moved = tmp_path / "serving-machine" / "model"
    shutil.copytree(exported, moved)

    def no_checkpoints(*args, **kwargs):
        raise AssertionError("a backend read a training checkpoint")
    monkeypatch.setattr(torch, "load", no_checkpoints)
    for backend in ("onnxruntime", "torch", "torch-triton"):
        report = run(moved, backend)
        assert report["texts"] == before, backend
        assert report["artifacts"] == str(moved)


@pytest.mark.parametrize("name", ["prefill", "decode", "context_generation"])
def test_every_graph_tensor_is_declared_once(exported, name):
    """The manifest's I/O contract is the declaration itself; the saved ONNX agrees with it."""
    import onnx

    from mmgpt.contract.artifacts import Artifacts
    from mmgpt.contract.graphs import declare_graphs
    from mmgpt.export.onnx_graphs import check_against_declaration
    artifacts = Artifacts.open(exported)
    graph = declare_graphs(artifacts.manifest.dims)[name]
    assert artifacts.manifest.graphs[name].inputs == graph.io(artifacts.manifest.dtype)["inputs"]
    check_against_declaration(onnx.load(artifacts.graph_path(name), load_external_data=False), graph,
                              artifacts.manifest.dtype)
