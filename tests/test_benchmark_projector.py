"""Smoke test of the projector benchmark (tiny shape): it runs, prints a table and writes JSON."""

import json

import pytest

from pargo_jax.benchmarks import projector as bench


def test_flop_count_of_the_official_shape():
    from pargo_jax.models.projectors import projector_config

    gflop = projector_config("pargo", bench.OFFICIAL).flops(576) / 1e9
    assert gflop == pytest.approx(17.22, abs=0.01)


def test_projector_benchmark_runs_and_writes_json(tmp_path, capsys):
    out = tmp_path / "projector.json"
    res = bench.main(
        ["--quick", "--impls", "structured", "--xla_options", "no_ynn", "--repeats", "1", "--out", str(out)]
    )
    saved = json.loads(out.read_text())
    assert saved["quick"] and saved["machine_gflops"] > 0
    rows = {(r["impl"], r["mode"]): r for r in saved["rows"]}
    assert rows[("jax structured [no_ynn]", "fwd+bwd")]["images_per_s"] > 0
    assert ("torch", "fwd+bwd") in rows  # torch is a test dependency
    assert rows[("jax structured [no_ynn]", "fwd")]["max_abs_diff_vs_torch"] < 1e-4
    assert res["gflop_per_image"]["fwd+bwd"] == pytest.approx(3 * res["gflop_per_image"]["fwd"])
    assert "images/s" in capsys.readouterr().out
