"""The results layout: benchmarks/results/<date>-<gpu>/<date>-<gpu>-<what>.json (and .md beside a report), one
folder per GPU and day, indexed in benchmarks/results/README.md. Every script that measures writes through here, and
every report records the commit of the code that measured it."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from mmgpt.files import write_atomic, write_json

REPO = Path(__file__).resolve().parents[2]


def git_commit() -> str:
    """The commit the measuring code is at ('+dirty' when tracked files differ from it). A copy without .git (a GPU
    machine's working tree) names it with MMGPT_COMMIT=<sha>; otherwise 'unknown', which a reader can see."""
    if os.environ.get("MMGPT_COMMIT"):
        return os.environ["MMGPT_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if sha.returncode != 0:
        return "unknown"
    return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def slug(gpu: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-")


def result_path(root, date: str, gpu: str, what: str, suffix: str = ".json") -> Path:
    folder = Path(root) / f"{date}-{slug(gpu)}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{date}-{slug(gpu)}{'-' + what if what else ''}{suffix}"


def write_result(root, report: dict, what: str, table: str | None = None) -> Path:
    """The report's JSON (and its Markdown table), each written atomically; returns the JSON's path. A report
    without a `commit` gets this checkout's."""
    report.setdefault("commit", git_commit())
    path = result_path(root, report["date"], report["gpu"], what)
    write_json(path, report)
    if table is not None:
        write_atomic(path.with_suffix(".md"), table + "\n")
    return path


def publish(root, report: dict, table: str) -> Path:
    """write_result for a command: also prints the table and where the report went."""
    path = write_result(root, report, report["tag"], table)
    print(table)
    print(f"wrote {path}")
    return path

