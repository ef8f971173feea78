"""ParGo projector throughput: JAX (dense and structured paths) vs the exported PyTorch ParGo, same weights.

  python -m pargo_jax.benchmarks.projector                      # official shape, B=8, JSON to bench_results/
  python -m pargo_jax.benchmarks.projector --quick --out /tmp/p.json   # tiny shape (smoke test)
  python -m pargo_jax.benchmarks.projector --xla_options default,no_ynn   # compare XLA:CPU option sets

The PyTorch side is the exported model's ParGo (``pargo_jax.convert.hf_code.modeling_pargo``, what a
user runs after ``pargo_jax.export``), holding the same weights through the exporter.

For each implementation: images/s of the forward and of forward+backward (gradients w.r.t. every
projector parameter; features are constants, as in training with a frozen tower). Timings are
interleaved (round r runs every variant once, in rotated order) and the median over ``--repeats``
rounds is reported, so a machine shared with other jobs slows every variant alike. The FLOP count is
analytic (matmuls only, attention counted dense: P+G queries x N patches, as the dense path computes
it), forward+backward = 3x forward. The machine's large-matmul rate (2048^3 fp32, JAX and PyTorch,
interleaved too) is measured in the same run and each row reports the fraction of it achieved.

XLA:CPU options are passed per compilation (``compile(compiler_options=...)``), so they apply here
whatever XLA_FLAGS says. ``--xla_options`` picks named sets from ``XLA_OPTION_SETS``; the first one
is used for the dense/structured rows, the others add structured rows for comparison. "vs torch" is
the ratio of medians; "paired" the median over rounds of the per-round ratio.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time

from pargo_jax import launcher

# Named XLA:CPU option sets (DebugOptions fields). "default" = jaxlib's defaults (dots via YNNPACK).
XLA_OPTION_SETS = {
    "default": {},
    # Every dot (and reduction) through XLA's Eigen runtime instead of YNNPACK: on this projector's
    # matmul shapes Eigen was as fast or faster (2 cores, AVX-512); same float32 results up to rounding.
    "no_ynn": {"xla_cpu_experimental_ynn_fusion_type": ""},
}
# (xla_cpu_use_onednn / the xnn fusion types parse but change nothing in jaxlib 0.10.2's CPU build.)

OFFICIAL = dict(num_partial=288, num_global=16, hidden=512, heads=8, layers=4, mlp_dim=2048,
                vision_width=1024, llm_width=4096, max_positions=512)  # fmt: skip
QUICK = dict(num_partial=8, num_global=2, hidden=32, heads=4, layers=2, mlp_dim=48, vision_width=24,
             llm_width=20, max_positions=64)  # fmt: skip


def _args(argv=None):
    p = launcher.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--patches", type=int, default=576, help="N vision patches per image")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds (median reported)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores, as XLA uses)")
    p.add_argument("--quick", action="store_true", help="tiny shape: a smoke test, not a measurement")
    p.add_argument("--impls", default="structured,dense", help="JAX paths to time")
    p.add_argument(
        "--xla_options",
        default="no_ynn,default",
        help=f"comma list of {sorted(XLA_OPTION_SETS)}; the first is used for every JAX path",
    )
    p.add_argument("--no_torch", action="store_true", help="skip the PyTorch reference")
    p.add_argument("--matmul_size", type=int, default=2048)
    p.add_argument("--out", default="bench_results/projector.json")
    return p.parse_args(argv)


def _load_avg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def torch_projector(config, params, num_patches: int):
    """The exported model's PyTorch ParGo (``pargo_jax.export``: the official module names, masks as
    buffers) holding ``params``, or None when PyTorch / transformers cannot be imported."""
    try:
        import torch

        from pargo_jax.convert.hf_code.modeling_pargo import ParGoProjector
    except ImportError:
        return None
    import numpy as np

    from pargo_jax.export import projector_tensors

    export_config, tensors = projector_tensors(params, config, num_patches)
    module = ParGoProjector(export_config, config.vision_width, config.llm_width, num_patches)
    module.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}, strict=True)
    return module


def main(argv=None) -> dict:
    a = _args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import linen as nn

    from pargo_jax.models.projectors import projector_config, projector_module

    shape = dict(QUICK if a.quick else OFFICIAL)
    n = 16 if a.quick else a.patches
    batch = 2 if a.quick else a.batch
    mm = 128 if a.quick else a.matmul_size
    option_names = [s for s in a.xla_options.split(",") if s]
    for name in option_names:
        if name not in XLA_OPTION_SETS:
            raise ValueError(f"--xla_options {name!r} is not one of {sorted(XLA_OPTION_SETS)}.")
    impls = [s for s in a.impls.split(",") if s]
    threads = a.threads or os.cpu_count() or 1
    base = projector_config("pargo", shape)
    gflop_fwd = base.flops(n) / 1e9
    gflop = {"fwd": gflop_fwd, "fwd+bwd": 3 * gflop_fwd}

    rng = np.random.RandomState(0)
    feats = rng.randn(batch, n, shape["vision_width"]).astype(np.float32)
    cot = rng.randn(batch, shape["num_partial"] + shape["num_global"], shape["llm_width"]).astype(np.float32)

    params = nn.unbox(jax.jit(projector_module(base).init)(jax.random.key(0), feats[:1])["params"])
    ref, torch_note = None, "--no_torch given."
    if not a.no_torch:  # the same weights on both sides, so outputs can be compared too
        ref = torch_projector(base, params, n)
        torch_note = None if ref is not None else "No PyTorch / transformers: PyTorch rows skipped."
    if torch_note:
        print(torch_note)
    if ref is not None:
        import torch

        torch.set_num_threads(threads)
    x, g = jnp.asarray(feats), jnp.asarray(cot)

    fns, outputs, compile_s = {}, {}, {}

    def add_jax(label, config, options):
        module = projector_module(config)

        def fwd(p, x):
            return module.apply({"params": p}, x)

        def fwd_bwd(p, x, g):
            y, vjp = jax.vjp(lambda p: module.apply({"params": p}, x), p)
            return y, vjp(g)[0]

        for mode, fn, args in (("fwd", fwd, (params, x)), ("fwd+bwd", fwd_bwd, (params, x, g))):
            t0 = time.perf_counter()
            compiled = jax.jit(fn).lower(*args).compile(compiler_options=XLA_OPTION_SETS[options])
            out = jax.block_until_ready(compiled(*args))
            compile_s[(label, mode)] = time.perf_counter() - t0
            fns[(label, mode)] = lambda c=compiled, args=args: jax.block_until_ready(c(*args))
            outputs[(label, mode)] = np.asarray(out if mode == "fwd" else out[0])

    for impl in impls:
        add_jax(f"jax {impl} [{option_names[0]}]", dataclasses.replace(base, impl=impl), option_names[0])
    for options in option_names[1:]:
        add_jax(f"jax {impls[0]} [{options}]", dataclasses.replace(base, impl=impls[0]), options)

    if ref is not None:
        import torch

        xt, gt = torch.from_numpy(feats), torch.from_numpy(cot)

        def torch_fwd():
            with torch.no_grad():
                return ref(xt)

        def torch_fwd_bwd():
            ref.zero_grad(set_to_none=True)
            y = ref(xt)
            y.backward(gt)
            return y

        for mode, fn in (("fwd", torch_fwd), ("fwd+bwd", torch_fwd_bwd)):
            t0 = time.perf_counter()
            outputs[("torch", mode)] = fn().detach().numpy()
            compile_s[("torch", mode)] = time.perf_counter() - t0
            fns[("torch", mode)] = fn

    # The machine's large-matmul rate, JAX and PyTorch.
    m1 = jnp.asarray(rng.randn(mm, mm).astype(np.float32))
    matmul = (
        jax.jit(lambda u, v: u @ v).lower(m1, m1).compile(compiler_options=XLA_OPTION_SETS[option_names[0]])
    )
    fns[("matmul jax", "mm")] = lambda: matmul(m1, m1).block_until_ready()
    if ref is not None:
        import torch

        t1 = torch.from_numpy(np.array(m1))
        fns[("matmul torch", "mm")] = lambda: t1 @ t1
    for f in [f for k, f in fns.items() if k[1] == "mm"]:
        f()

    keys = list(fns)
    times = {k: [] for k in keys}
    for r in range(max(1, a.repeats)):
        for k in keys[r % len(keys) :] + keys[: r % len(keys)]:  # rotate the order each round
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)

    med = {k: float(np.median(v)) for k, v in times.items()}
    mm_gflops = {k[0].split()[1]: 2 * mm**3 / med[k] / 1e9 for k in keys if k[1] == "mm"}
    machine = max(mm_gflops.values())

    rows = []
    for label, mode in [k for k in keys if k[1] != "mm"]:
        t = med[(label, mode)]
        ref_key = ("torch", mode)
        row = dict(
            impl=label, mode=mode, batch=batch, median_s=t, min_s=min(times[(label, mode)]),
            images_per_s=batch / t, gflops=gflop[mode] * batch / t,
            fraction_of_matmul_rate=gflop[mode] * batch / t / machine,
            speedup_vs_torch=(med[ref_key] / t) if ref_key in med else None,
            # Per round (variants of a round run back to back), then the median: robust to load
            # that changes between rounds on a shared machine.
            paired_speedup_vs_torch=float(np.median(np.divide(times[ref_key], times[(label, mode)])))
            if ref_key in times else None,
            compile_or_warmup_s=compile_s[(label, mode)], times_s=times[(label, mode)],
        )  # fmt: skip
        if ref_key in outputs and label != "torch":
            row["max_abs_diff_vs_torch"] = float(np.max(np.abs(outputs[(label, mode)] - outputs[ref_key])))
        rows.append(row)

    load = _load_avg()
    print(
        f"\nParGo projector, B={batch}, N={n}, C={shape['vision_width']}, queries={shape['num_partial']}+"
        f"{shape['num_global']}, H={shape['hidden']}, heads={shape['heads']}, L={shape['layers']}, "
        f"FFN={shape['mlp_dim']}, D={shape['llm_width']}; {gflop_fwd:.3g} GFLOP/image forward, "
        f"{3 * gflop_fwd:.3g} forward+backward"
    )
    print(
        f"machine: {os.cpu_count()} cores, torch threads {threads if ref is not None else '-'}, load "
        f"average {load}; {mm}^3 fp32 matmul: "
        + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in mm_gflops.items())
    )
    head = f"{'implementation':28s} {'mode':8s} {'images/s':>9s} {'GFLOP/s':>8s} {'of matmul':>9s}"
    head += f" {'vs torch':>8s} {'paired':>7s}"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        vs, paired = (
            (f"{r[k]:.2f}x" if r[k] is not None else "-")
            for k in ("speedup_vs_torch", "paired_speedup_vs_torch")
        )
        print(
            f"{r['impl']:28s} {r['mode']:8s} {r['images_per_s']:9.2f} {r['gflops']:8.1f} "
            f"{100 * r['fraction_of_matmul_rate']:8.0f}% {vs:>8s} {paired:>7s}"
        )
    diffs = [r["max_abs_diff_vs_torch"] for r in rows if "max_abs_diff_vs_torch" in r]
    if diffs:
        print(f"max |jax - torch| over outputs: {max(diffs):.2e}")

    result = dict(
        shape=dict(shape, num_patches=n, batch=batch), gflop_per_image=gflop, repeats=a.repeats,
        matmul_size=mm, matmul_gflops=mm_gflops, machine_gflops=machine, rows=rows, load_average=load,
        cpu_count=os.cpu_count(), torch_threads=threads if ref is not None else None, torch_note=torch_note,
        xla_options={k: XLA_OPTION_SETS[k] for k in option_names}, xla_flags_env=os.environ.get("XLA_FLAGS"),
        jax_version=jax.__version__, platform=platform.platform(), quick=a.quick,
    )  # fmt: skip
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as fh:
            json.dump(result, fh, indent=1)
        print(f"wrote {a.out}")
    return result


if __name__ == "__main__":
    launcher.run_argparse(main)
