"""Smoke test of the input benchmark (tiny sizes): it runs, prints a table and writes JSON."""

import json

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
            "48x40",
            "--num_image_tokens",
            "4",
            "--max_len",
            "96",
            "--out",
            str(out),
        ]
    )
    saved = json.loads(out.read_text())
    (row,) = saved["rows"]
    assert row["size"] == 32 and row["raw_decode_resize"] > 0 and row["pipeline"]["0"] > 0
    assert res["rows"][0]["overhead_vs_raw"] is not None
    assert "raw" in capsys.readouterr().out
