"""An artifacts directory, `artifacts/<name>/`: self-contained, everything after training reads it and nothing else.

    model.json                 the manifest (contract/manifest.py)
    weights.bin                every weight once: the graphs' external data and the PyTorch backends' weights
    prefill.onnx, decode.onnx, context_generation.onnx
    tokenizer files            where the tokenizer has any (a Hugging Face tokenizer.json)
    parity.json                ONNX Runtime against PyTorch, written by the export
    hf/                        the same model as a transformers GPT-2 + the prefix encoder's weights
    *.engine                   TensorRT engines, built on the machine that runs them (recorded in model.json)

`Artifacts.open` checks the manifest, the files it names, the weights' hash and that the weights have the shapes
the manifest's model config implies, before any backend sees them.
"""
from __future__ import annotations

from pathlib import Path

import torch

from mmgpt.contract import weights as weights_file
from mmgpt.contract.engines import EngineBuild
from mmgpt.files import STAGING
from mmgpt.contract.manifest import MANIFEST_FILE, ArtifactsError, Manifest
from mmgpt.model import MultimodalGPT


class Artifacts:
    def __init__(self, path: Path, manifest: Manifest):
        self.path, self.manifest = Path(path), manifest

    @classmethod
    def open(cls, path, verify_weights: bool = True) -> "Artifacts":
        path = Path(path)
        if not path.is_dir():
            raise ArtifactsError(f"{path}: no such artifacts directory; run `python export.py` first, or point "
                                 "artifacts= at a directory export.py wrote")
        manifest = Manifest.read(path)
        unrecorded = [g.file for g in manifest.graphs.values() if g.file not in manifest.file_records()]
        if unrecorded:
            raise ArtifactsError(f"{path / MANIFEST_FILE}: graph file(s) {unrecorded} are not among its recorded "
                                 "files; re-export: `python export.py`")
        check_weight_shapes(manifest)
        if verify_weights:
            weights_file.verify_files(path, manifest.file_records())
        return cls(path, manifest)

    def graph_path(self, name: str) -> Path:
        if name not in self.manifest.graphs:
            raise ArtifactsError(f"{self.path}: no '{name}' graph; it has {sorted(self.manifest.graphs)}")
        return self.path / self.manifest.graphs[name].file

    @property
    def tokenizer(self):
        from mmgpt.tokenizer import tokenizer_from_dict
        return tokenizer_from_dict(self.manifest.tokenizer, self.path)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return weights_file.load_state_dict(self.path, self.manifest.weights)

    def load_model(self, device="cpu") -> MultimodalGPT:
        """The exported model as PyTorch, built from the manifest's config and weights.bin alone."""
        with torch.device("meta"):
            model = MultimodalGPT(self.manifest.config)
        model.load_state_dict(self.state_dict(), assign=True)
        if model.config.tie_weights:
            model.tie_head()  # assign=True replaced the tied tensor
        return model.to(device).eval()

    def record_engines(self, strategy: str, entry: EngineBuild) -> None:
        self.manifest.engines = {**self.manifest.engines, strategy: entry}
        self.manifest.write(self.path)


def check_weight_shapes(manifest: Manifest) -> None:
    """The manifest's model config must describe exactly the tensors in weights.bin."""
    with torch.device("meta"):
        want = {k: list(v.shape) for k, v in MultimodalGPT(manifest.config).state_dict().items()}
    have = {k: loc.shape for k, loc in manifest.weights.tensors.items()}
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    wrong = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if missing or extra or wrong:
        details = "; ".join(f"{what} {names[:3]}{' ...' if len(names) > 3 else ''}" for what, names in
                            (("missing", missing), ("unexpected", extra), ("of other shapes", wrong)) if names)
        raise ArtifactsError(f"model.json's model_config does not describe the weights in {manifest.weights.file} "
                             f"(tensors {details}); the manifest was edited or mixed with another export: re-run "
                             "`python export.py`")


def find_latest_artifacts(root) -> Path:
    """The newest complete export under `root` (staging directories of exports in progress are not exports)."""
    root = Path(root)
    found = [p.parent for p in root.glob(f"*/{MANIFEST_FILE}")
             if not p.parent.name.startswith(".") and STAGING not in p.parent.name]
    if not found:
        raise ArtifactsError(f"no exported model under {root.resolve()}; run `python export.py` first")
    return max(found, key=lambda p: (p / MANIFEST_FILE).stat().st_mtime)
