"""The decode benchmark on a tiny model: identical tokens on both sides, the bandwidth columns."""

from pargo_jax.benchmarks import decode


def test_decode_benchmark_tiny(tmp_path):
    out = tmp_path / "decode.json"
    r = decode.main(
        ["--vocab_size", "128", "--hidden_size", "32", "--intermediate_size", "64", "--num_layers", "2",
         "--num_heads", "4", "--num_kv_heads", "2", "--batch", "2", "--prompt_len", "8", "--new_tokens", "4",
         "--repeats", "1", "--bandwidth_mb", "8", "--out", str(out)]
    )  # fmt: skip
    assert out.exists()
    assert r["tokens_match"], r["token_agreement"]
    assert r["ours"]["tokens_per_s"] > 0 and r["transformers"]["tokens_per_s"] > 0
    assert r["read_bandwidth_gb_per_s"] > 0.1
    expected = 4 * r["model"]["num_params"] * 4 / r["ours"]["seconds"] / 1e9
    assert abs(r["weights_gb_per_s"] - expected) < 1e-9 * max(1.0, expected)
    assert r["bandwidth_fraction"] == r["weights_gb_per_s"] / r["read_bandwidth_gb_per_s"]
