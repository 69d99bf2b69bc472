"""Exports never destroy what is already on disk: a name is one path component, nothing replaces the output root,
and a replace killed between its two renames is restored by the next export. Each case checks that the other
exports are byte-identical afterwards."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import export_command, fails, tree_digest
from mmgpt.cli import run_command
from mmgpt.files import check_component, remove_stale_staging, staging_dir

FAST = ["parity.enabled=false", "hf.enabled=false"]


@pytest.fixture
def root(exported, tmp_path):
    """An output root holding two earlier exports."""
    root = tmp_path / "artifacts"
    for name in ("run_a", "run_b"):
        shutil.copytree(exported, root / name)
    return root


def _dead_pid() -> int:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    return dead.pid


def test_a_checkpoint_outside_a_run_directory_needs_a_name(root, trained, tmp_path, capsys, monkeypatch):
    before = tree_digest(root)
    shutil.copy(trained["last_ckpt"], tmp_path / "last.ckpt")
    monkeypatch.chdir(tmp_path)  # `python export.py ckpt=last.ckpt` from the folder holding artifacts/
    fails(export_command("ckpt=last.ckpt", f"output_root={root}", *FAST), capsys,
          "ckpt=last.ckpt does not lie in <run>/checkpoints/", "pass name=")
    assert tree_digest(root) == before
    assert sorted(p.name for p in root.iterdir()) == ["run_a", "run_b"]


def test_the_run_name_is_derived_from_the_checkpoint_path(root, trained, capsys):
    before = tree_digest(root)
    final = run_command(export_command(f"ckpt={trained['last_ckpt']}", f"output_root={root}", *FAST))
    run = Path(trained["last_ckpt"]).resolve().parent.parent.name  # <run>/checkpoints/last.ckpt
    assert final == root / run and (final / "model.json").is_file()
    assert {k: v for k, v in tree_digest(root).items() if k.startswith(("run_a/", "run_b/"))} == before


@pytest.mark.parametrize("name", ["../escaped", "", ".", "..", "a/b", ".hidden", "/abs"])
def test_an_export_name_is_one_path_component(root, trained, tmp_path, capsys, name):
    before = tree_digest(tmp_path)
    fails(export_command(f"ckpt={trained['last_ckpt']}", f"output_root={root}", f"name='{name}'", *FAST), capsys,
          f"name={name!r} must be one plain directory name")
    assert tree_digest(tmp_path) == before  # nothing written, inside the root or outside it


def test_a_directory_that_is_not_an_export_is_never_replaced(root, trained, capsys):
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("mine")
    before = tree_digest(root)
    fails(export_command(f"ckpt={trained['last_ckpt']}", f"output_root={root}", "name=notes", *FAST), capsys,
          "notes exists and is not an export (no model.json)")
    assert tree_digest(root) == before


def test_an_interrupted_replace_is_restored_not_deleted(root, trained, capsys):
    before = tree_digest(root)
    old = root / f".run_a.old.partial-{_dead_pid()}"
    os.replace(root / "run_a", old)  # killed between `final -> old` and `staging -> final`: old is the only copy
    run_command(export_command(f"ckpt={trained['last_ckpt']}", f"output_root={root}", "name=run_c", *FAST))
    assert f"restored {old}" in capsys.readouterr().out
    assert sorted(p.name for p in root.iterdir()) == ["run_a", "run_b", "run_c"]
    assert {k: v for k, v in tree_digest(root).items() if not k.startswith("run_c/")} == before


def test_an_old_copy_is_removed_once_the_new_one_is_in_place(root):
    before = tree_digest(root)
    old = root / f".run_a.old.partial-{_dead_pid()}"
    shutil.copytree(root / "run_b", old)  # killed after both renames, before removing the old copy
    assert remove_stale_staging(root) == [(old, "removed")]
    assert tree_digest(root) == before


def test_staging_never_replaces_a_parent(tmp_path):
    (tmp_path / "keep").write_text("x")
    with pytest.raises(ValueError, match="must be one plain directory name"):
        with staging_dir(tmp_path / "sub" / ".."):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]
    assert check_component("digits_run1") == "digits_run1"  # negative control: an ordinary name passes
