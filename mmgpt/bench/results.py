"""The results layout: benchmarks/results/<date>-<gpu>/<date>-<gpu>-<what>.json (and .md beside a report), one
folder per GPU and day, indexed in benchmarks/results/README.md. Every script that measures writes through here."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

from mmgpt.files import write_atomic, write_json


def slug(gpu: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-")


def result_path(root, date: str, gpu: str, what: str, suffix: str = ".json") -> Path:
    folder = Path(root) / f"{date}-{slug(gpu)}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{date}-{slug(gpu)}{'-' + what if what else ''}{suffix}"


def write_result(root, report: dict, what: str, table: str | None = None) -> Path:
    """The report's JSON (and its Markdown table), each written atomically; returns the JSON's path."""
    path = result_path(root, report["date"], report["gpu"], what)
    write_json(path, report)
    if table is not None:
        write_atomic(path.with_suffix(".md"), table + "\n")
    return path


def git_commit() -> str | None:
    """The commit the measured code is at ('+dirty' with uncommitted changes); None outside a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
