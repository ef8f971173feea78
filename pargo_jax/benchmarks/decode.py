"""Greedy decoding throughput: our jit KV-cache ``generate`` vs transformers ``generate`` (torch CPU),
same random-weight model (SmolLM2-135M shape by default) and the same left-padded prompts.

  python -m pargo_jax.benchmarks.decode --out /tmp/decode.json
  python -m pargo_jax.benchmarks.decode --num_layers 4 --batch 2 --new_tokens 32   # quick

Prints a table (tokens/s = batch * new tokens / wall time, best of ``--repeats``; compile time apart)
and writes JSON. Both sides must produce identical tokens, which the script checks.

Greedy decoding at small batch is bound by memory bandwidth: every new token reads every weight once.
The script also reports that rate (float32 weight bytes x new tokens / seconds) beside the machine's
read bandwidth, measured in the same run as a jitted sum over a ``--bandwidth_mb`` array (best of 5),
so the table says how close decoding is to its limit.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

from pargo_jax import launcher


def _args(argv=None):
    p = launcher.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab_size", type=int, default=49152)
    p.add_argument("--hidden_size", type=int, default=576)
    p.add_argument("--intermediate_size", type=int, default=1536)
    p.add_argument("--num_layers", type=int, default=30)
    p.add_argument("--num_heads", type=int, default=9)
    p.add_argument("--num_kv_heads", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--scan_layers", action="store_true", help="scan over layers (faster compile)")
    p.add_argument("--bandwidth_mb", type=int, default=1024, help="array size of the read-bandwidth probe")
    p.add_argument("--out", default="decode_benchmark.json")
    return p.parse_args(argv)


def read_bandwidth(megabytes: int, repeats: int = 5) -> float:
    """GB/s of a jitted float32 sum over a ``megabytes`` array (best of ``repeats``, compile apart)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((megabytes * 2**20 // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        total(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return x.nbytes / best / 1e9


def left_padded_prompts(batch: int, prompt_len: int, vocab_size: int, seed: int = 0):
    """Random prompt ids (batch, prompt_len) and their mask: row r left-padded by 3 r tokens (id 0)."""
    import numpy as np

    rng = np.random.RandomState(seed)
    ids = rng.randint(3, vocab_size, (batch, prompt_len))
    mask = np.ones_like(ids)
    for row in range(1, batch):  # left padding of different lengths
        ids[row, : row * 3], mask[row, : row * 3] = 0, 0
    return ids, mask


def best_time(fn, repeats: int):
    """(fastest wall seconds of ``repeats`` calls of ``fn()``, its last output)."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def time_greedy(module, variables, ids, mask, new_tokens: int, repeats: int, check_every: int = 1) -> dict:
    """Our jitted KV-cache greedy ``generate`` of ``new_tokens``: ``first_call_seconds`` (compile
    included), ``seconds`` (best of ``repeats``) and the ``tokens`` (host array)."""
    from pargo_jax.generate import generate

    def run():
        kw = dict(attention_mask=mask, max_new_tokens=new_tokens, check_every=check_every)
        return generate(module, variables, input_ids=ids, **kw).tokens

    first, _ = best_time(run, 1)
    seconds, tokens = best_time(run, repeats)
    return dict(first_call_seconds=first, seconds=seconds, tokens=tokens)


def main(argv=None) -> dict:
    a = _args(argv)
    import jax
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pargo_jax.convert.hf import load_llm

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=a.vocab_size, hidden_size=a.hidden_size, intermediate_size=a.intermediate_size,
        num_hidden_layers=a.num_layers, num_attention_heads=a.num_heads, num_key_value_heads=a.num_kv_heads,
        max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=100000.0, pad_token_id=0,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None  # random weights: decode the full length on both sides
    ids, mask = left_padded_prompts(a.batch, a.prompt_len, a.vocab_size)

    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        module, variables = load_llm(d, scan_layers=a.scan_layers)

    def theirs():
        with torch.no_grad():
            out = model.generate(
                torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=a.new_tokens,
                min_new_tokens=a.new_tokens, do_sample=False, pad_token_id=0,
            )  # fmt: skip
        return out[:, a.prompt_len :].numpy()

    ours = time_greedy(module, variables, ids, mask, a.new_tokens, a.repeats)
    compile_s, ours_s, our_tokens = ours["first_call_seconds"], ours["seconds"], ours["tokens"]
    best_time(theirs, 1)  # warm-up
    hf_s, hf_tokens = best_time(theirs, a.repeats)
    n = a.batch * a.new_tokens
    num_params = sum(p.numel() for p in model.parameters())
    weights_gb_s = 4 * num_params * a.new_tokens / ours_s / 1e9  # every new token reads every weight
    bandwidth_gb_s = read_bandwidth(a.bandwidth_mb)
    result = dict(
        model=dict(cfg.to_diff_dict(), num_params=num_params),
        batch=a.batch, prompt_len=a.prompt_len, new_tokens=a.new_tokens, scan_layers=a.scan_layers,
        devices=str(jax.devices()[0].platform), torch_threads=torch.get_num_threads(),
        cpu_count=os.cpu_count(),
        ours=dict(seconds=ours_s, tokens_per_s=n / ours_s, first_call_seconds=compile_s),
        transformers=dict(seconds=hf_s, tokens_per_s=n / hf_s),
        speedup=hf_s / ours_s,
        weights_gb_per_s=weights_gb_s, read_bandwidth_gb_per_s=bandwidth_gb_s,
        bandwidth_fraction=weights_gb_s / bandwidth_gb_s,
        tokens_match=bool((our_tokens == hf_tokens).all()),
        token_agreement=float((our_tokens == hf_tokens).mean()),
    )  # fmt: skip
    print(f"greedy decode, {result['model']['num_params'] / 1e6:.0f}M params, batch {a.batch}, "
          f"prompt {a.prompt_len}, {a.new_tokens} new tokens")  # fmt: skip
    print(f"{'impl':<14}{'seconds':>10}{'tokens/s':>12}")
    print(
        f"{'pargo_jax':<14}{ours_s:>10.3f}{n / ours_s:>12.1f}   (first call incl. compile {compile_s:.1f}s)"
    )
    print(f"{'transformers':<14}{hf_s:>10.3f}{n / hf_s:>12.1f}")
    print(f"speedup {result['speedup']:.2f}x, identical tokens: {result['tokens_match']}")
    fraction = 100 * result["bandwidth_fraction"]
    print(
        f"pargo_jax streams weights at {weights_gb_s:.1f} GB/s; this machine reads {bandwidth_gb_s:.1f} "
        f"GB/s (jitted sum over {a.bandwidth_mb} MB): {fraction:.0f}% of that limit"
    )
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    launcher.run_argparse(main)
