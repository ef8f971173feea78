"""Smoke test of the input benchmark (tiny sizes): it runs, prints a table and writes JSON, with the
JPEG draft decoding row."""

import json

import pytest

from pargo_jax.benchmarks import input as bench


def test_input_benchmark_runs_and_writes_json(tmp_path, capsys):
    out = tmp_path / "input.json"
    res = bench.main(
        [
            "--num_images",
            "8",
            "--sizes",
            "32",
            "--workers",
            "0",
            "--batch_size",
            "4",
            "--num_records",
            "16",
            "--source_size",
            "96x80",  # >= 2x the size: the draft decode runs at half scale
            "--num_image_tokens",
            "4",
            "--max_len",
            "96",
            "--jpeg_draft",
            "--out",
            str(out),
        ]
    )
    saved = json.loads(out.read_text())
    (row,) = saved["rows"]
    assert row["size"] == 32 and row["raw_decode_resize"] > 0 and row["pipeline"]["0"] > 0
    assert res["rows"][0]["overhead_vs_raw"] is not None
    assert saved["args"]["jpeg_draft"] and row["raw_draft_decode"] == row["raw_decode_resize"]
    assert row["draft_speedup"] == pytest.approx(row["raw_draft_decode"] / row["raw_full_decode"])
    printed = capsys.readouterr().out
    assert "raw" in printed and "draft x" in printed and "JPEG draft decoding on" in printed
