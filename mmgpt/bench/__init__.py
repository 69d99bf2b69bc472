"""Benchmarks: `python -m mmgpt.bench` (decode speed, the default) and `python -m mmgpt.bench train` (training step
speed). Each writes a results JSON (GPU name, date, versions) and a Markdown table under benchmarks/results/."""
