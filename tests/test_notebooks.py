"""Every notebook runs top to bottom on a CPU (small parameters at the top of each), in order: 02 exports what 01
trained, 03 plots the committed GPU benchmark reports. A failing cell fails the run."""
import os
from pathlib import Path

import pytest

from helpers import ROOT, require

nbformat = require("nbformat", "nbformat is not installed (pip install -e .[dev])")
NotebookClient = require("nbclient", "nbclient is not installed (pip install -e .[dev])").NotebookClient

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# Parameters the test sets in a notebook's first cell (what papermill would inject): fewer training steps keep the
# suite inside its time budget; the notebook's own value is what a reader runs.
PARAMETERS = {"01_data_and_model": {"TRAIN_STEPS": 80, "DRAW_STEPS": 40}}


# 01 trains and 02 exports and builds engines: the slow pass runs them; 03 only plots committed results
@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.slow) if p.stem[:2] in ("01", "02") else p
                                  for p in NOTEBOOKS], ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path):
    nb = nbformat.read(path, as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit notebooks without outputs"
    os.environ["CI"] = os.environ.get("CI", "1")
    first = next(c for c in nb.cells if c.cell_type == "code")
    for name, value in PARAMETERS.get(path.stem, {}).items():
        lines = first.source.splitlines()
        assert any(line.startswith(f"{name} =") for line in lines), f"{path.name} has no parameter {name}"
        first.source = "\n".join(f"{name} = {value!r}" if line.startswith(f"{name} =") else line for line in lines)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    figures = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert figures >= 1
