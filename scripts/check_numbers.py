"""Every figure in the README's speed tables must be in a committed results file that the section cites.

    python scripts/check_numbers.py [README.md]

For each `## ... speed` section: the files it cites (backticked paths under benchmarks/results/, globs allowed; a
cited .md stands for its .json too) are read, every number in them collected (JSON values at any depth, and the
numbers written in .md / .log text), and each figure in the section's tables (not the row labels: model, batch, P,
shape) must equal one of them at the precision the README prints it (2,890 tok/s; 427k; 36.9% or 0.369; 2.5x).
Exits 1 listing each figure without a file behind it. CI runs it (.ci/run).
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LABELS = {"model", "batch", "p", "shape", "impl"}
FIGURE = re.compile(r"(?<![\w.])(\d[\d,]*(?:\.\d+)?)\s*(k|%|x|×)?")


def sections(text: str) -> dict[str, str]:
    """Each `## ... speed` section's text, by title."""
    parts = re.split(r"^## ", text, flags=re.M)
    return {p.splitlines()[0]: p for p in parts[1:] if p.splitlines()[0].lower().endswith("speed")}


def cited_files(section: str) -> list[Path]:
    files = []
    for cited in re.findall(r"`(benchmarks/results/[^`]+)`", section):
        for path in sorted(ROOT.glob(cited)):
            files.append(path)
            if path.suffix == ".md" and path.with_suffix(".json").is_file():
                files.append(path.with_suffix(".json"))
    return files


def numbers_in(path: Path) -> set[float]:
    if path.suffix == ".json":
        found = set()

        def walk(value):
            if isinstance(value, bool):
                return
            if isinstance(value, (int, float)):
                found.add(float(value))
            elif isinstance(value, dict):
                for v in value.values():
                    walk(v)
            elif isinstance(value, list):
                for v in value:
                    walk(v)
        walk(json.loads(path.read_text()))
        return found
    return {float(m.replace(",", "")) for m in re.findall(r"\d[\d,]*(?:\.\d+)?", path.read_text())}


def figures(section: str) -> list[tuple[str, str]]:
    """(column, figure) for every numeric cell of the section's tables, row labels left out."""
    out, header = [], None
    for line in section.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = [c.lower() for c in cells]
            continue
        if set(line) <= set("|-: "):
            continue
        for column, cell in zip(header, cells):
            if column not in LABELS:
                out += [(column, m.group(0).strip()) for m in FIGURE.finditer(cell)]
    return out


def matches(figure: str, values: set[float]) -> bool:
    m = FIGURE.fullmatch(figure)
    digits, unit = m.group(1).replace(",", ""), m.group(2)
    decimals = len(digits.split(".")[1]) if "." in digits else 0
    shown = float(digits)
    candidates = {"k": [v / 1000 for v in values], "%": [*values, *(100 * v for v in values)]}.get(unit, values)
    return any(round(v, decimals) == shown for v in candidates)


def check(readme: Path) -> list[str]:
    problems = []
    for title, section in sections(readme.read_text()).items():
        files = cited_files(section)
        if not files:
            problems.append(f"{title}: cites no file under benchmarks/results/")
            continue
        values = set().union(*(numbers_in(f) for f in files))
        for column, figure in figures(section):
            if not matches(figure, values):
                problems.append(f"{title}: '{figure}' ({column}) is in none of {[f.name for f in files]}")
    return problems


def main(argv=None) -> int:
    readme = Path((argv or sys.argv[1:] or [ROOT / "README.md"])[0])
    problems = check(readme)
    for p in problems:
        print(p)
    verdict = f"{len(problems)} figure(s) without a file" if problems else "every speed-table figure is in a cited file"
    print(f"{readme}: {verdict}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
