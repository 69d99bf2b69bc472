"""The README's speed tables: every figure is in a committed results file its section cites (scripts/check_numbers.py,
which CI also runs on its own)."""
import importlib.util

from helpers import ROOT

spec = importlib.util.spec_from_file_location("check_numbers", ROOT / "scripts" / "check_numbers.py")
check_numbers = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_numbers)


def test_every_readme_speed_figure_is_in_a_cited_results_file(tmp_path):
    assert check_numbers.check(ROOT / "README.md") == []
    readme = (ROOT / "README.md").read_text()
    assert "| 124M | 1 | 0 | 2,890 tok/s |" in readme
    edited = tmp_path / "README.md"  # negative controls: a figure no file holds, and a section citing no file
    edited.write_text(readme.replace("| 124M | 1 | 0 | 2,890 tok/s |", "| 124M | 1 | 0 | 2,990 tok/s |"))
    problems = check_numbers.check(edited)  # one problem, naming the figure and every file the section cites
    assert len(problems) == 1 and problems[0].startswith(
        "Decode speed: '2,990' (mmgpt graph + triton) is in none of "
        "['2026-11-25-NVIDIA-H100-80GB-HBM3-prefix-sweep.md', '2026-11-25-NVIDIA-H100-80GB-HBM3-prefix-sweep.json', ")
    assert "'2026-12-03-NVIDIA-H200-llama-family.json'" in problems[0]
    edited.write_text(readme.replace("`benchmarks/results/2026-11-25-NVIDIA-H100-80GB-HBM3/*-train-", "`elsewhere/"))
    problems = check_numbers.check(edited)  # the table's files no longer cited: only a log is left to look in
    assert problems[0] == "Training speed: '427k' (mmgpt cuda graph) is in none of ['train-digits_gpt2_124m.log']"
