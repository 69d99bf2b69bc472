import json

import pytest

from mmgpt.bench.decode import main, markdown_table


def test_smoke_report_is_well_formed(tmp_path):
    report = main(["--smoke", "--out", str(tmp_path), "--no-hf"])
    files = sorted(p.name for p in tmp_path.iterdir())
    assert any(f.endswith(".json") for f in files) and any(f.endswith(".md") for f in files)
    saved = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert saved["gpu"] == "cpu" and saved["versions"]["torch"] and saved["date"]
    impls = {r["impl"] for r in saved["rows"]}
    assert impls == {"mmgpt-eager-cpu/text", "mmgpt-eager-cpu/image"}
    for r in saved["rows"]:
        assert r["tokens_per_s"] > 0 and r["ttft_ms"] > 0 and r["weight_bytes"] > 0
        assert {"model", "dtype", "batch", "gb_per_s", "step_us"} <= set(r)
    assert all("multimodal_over_text" in r for r in saved["rows"] if r["impl"].endswith("/image"))
    assert markdown_table(report).count("\n| smoke |") == len(report["rows"])


def test_merge_keeps_every_row_and_later_files_win(tmp_path):
    a = main(["--smoke", "--out", str(tmp_path / "a"), "--no-hf", "--tag", "a"])
    b = main(["--smoke", "--out", str(tmp_path / "b"), "--no-hf", "--tag", "b"])
    pa, pb = next((tmp_path / "a").glob("*.json")), next((tmp_path / "b").glob("*.json"))
    merged = main(["--merge", str(pa), str(pb), "--out", str(tmp_path / "m")])
    assert len(merged["rows"]) == len(a["rows"]) == len(b["rows"])
    assert {r["source"] for r in merged["rows"]} == {pb.name}
    assert [r["tokens_per_s"] for r in merged["rows"]] == [r["tokens_per_s"] for r in b["rows"]]
    assert merged["merged_from"] == [pa.name, pb.name]


def test_train_smoke_report_is_well_formed(tmp_path):
    from mmgpt.bench.train import main as train_main, markdown_table as train_table
    report = train_main(["--smoke", "--out", str(tmp_path), "--no-hf"])
    path = next(tmp_path.glob("*-train.json"))
    saved = json.loads(path.read_text())
    assert saved["gpu"] == "cpu" and saved["versions"]["torch"] and saved["peak_flops"] is None
    (row,) = saved["rows"]
    assert row["impl"] == "mmgpt-eager" and (row["batch"], row["prefix_len"], row["text_len"]) == (2, 4, 8)
    assert row["tokens_per_s"] == pytest.approx(2 * 12 / (row["step_ms"] / 1e3), abs=0.1)  # rounded to 0.1
    assert row["mfu"] is None and row["first_step_s"] > 0 and row["flops_per_token"] > 6 * row["params"]
    assert path.with_suffix(".md").read_text().count("\n| smoke |") == 1 == train_table(report).count("| smoke |")
    merged = train_main(["--merge", str(path), "--out", str(tmp_path / "m")])
    assert merged["rows"][0]["tokens_per_s"] == row["tokens_per_s"] and (tmp_path / "m" / path.name).is_file()
