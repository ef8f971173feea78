"""``python -m pargo_jax.benchmarks.projectors``: the --quick grid through the command line, resuming
without retraining, and the table's LR choice and seed statistics."""

from __future__ import annotations

import json

import pytest

from pargo_jax.benchmarks import projectors as bench
from tests import procs


@pytest.mark.slow  # the --quick grid: two trainings in a 2-process pool
def test_quick_run_writes_the_table_and_resumes(tmp_path, capsys):
    """The command line (a subprocess), then the same command in this process: nothing retrained."""
    out = tmp_path / "bench"
    first = procs.run("pargo_jax.benchmarks.projectors", "--quick", f"--out={out}", devices=1)
    assert first.returncode == 0, first.stderr[-3000:]
    report = json.loads((out / "projectors_fine_caption.json").read_text())
    assert {r["variant"] for r in report["runs"]} == {"pargo", "resampler"}
    for run in report["runs"]:
        assert run["tokens"] == 16 and run["params"] > 0 and run["gflops"] > 0 and run["train_seconds"] > 0
        assert run["caption_loss"] > 0 and run["train_loss"] > 0
        assert all(0.0 <= run[k] <= 1.0 for k in ("colour", "shape", "count", "digit", "position"))
    table = (out / "projectors_fine_caption.md").read_text()
    assert "| pargo (8+8) | 16 |" in table and "| resampler | 16 |" in table
    assert (out / "projectors_fine_caption.png").read_bytes()[:4] == b"\x89PNG"
    bench.main(["--quick", f"--out={out}"])
    assert capsys.readouterr().out.count("done before, not retrained") == 2
    assert json.loads((out / "projectors_fine_caption.json").read_text())["runs"] == report["runs"]


def _result(variant, lr, seed, loss, accuracy):
    projector = dict(name="pargo", num_partial=8, num_global=8) if variant == "pargo" else dict(name=variant)
    return dict(variant=variant, budget=16, seed=seed, lr_scale=lr, train_loss=loss, accuracy=accuracy,
                tokens=16, params=10, gflops=1.0, train_seconds=2.0, projector=projector)  # fmt: skip


def test_summary_picks_the_lr_by_training_loss_and_averages_seeds():
    results = [
        _result("pargo", 1.0, 0, 0.5, 0.9), _result("pargo", 1.0, 1, 0.7, 0.7),  # mean loss 0.6
        _result("pargo", 3.0, 0, 0.4, 0.2), _result("pargo", 3.0, 1, 0.6, 0.4),  # mean loss 0.5: chosen
        _result("mlp", 1.0, 0, 0.9, 0.5),
    ]  # fmt: skip
    rows = {r["variant"]: r for r in bench.summarize(results)}
    assert rows["pargo"]["lr_scale"] == 3.0 and rows["pargo"]["split"] == "8+8"
    assert rows["pargo"]["accuracy"] == pytest.approx(0.3) and rows["pargo"]["accuracy_std"] == pytest.approx(
        0.1
    )
    assert rows["mlp"]["seeds"] == 1 and rows["mlp"]["accuracy_std"] == 0.0


def test_budgets_are_met_exactly_or_not_run():
    assert bench.projector_options("mlp", 36) is None  # 256 patches do not group into 36 tokens
    assert bench.projector_options("mlp", 16)["group"] == 16
    assert bench.projector_options("mlp", 16, "basic")["group"] == 4
    p = bench.projector_options("pargo", 36)
    assert p["num_partial"] + p["num_global"] == 36 and 256 % p["num_partial"] == 0
    assert bench.projector_options("resampler", 36)["num_queries"] == 36
    assert bench.projector_options("c_abstractor", 20) is None  # not a square


def test_mg_llava_variant_counts_its_object_tokens_in_the_budget(tmp_path):
    p = bench.projector_options("mg_llava", 16)
    assert (p["num_partial"], p["num_global"]) == (8, 4)  # + 4 object tokens = 16
    for c in bench.stage_configs(p, 0, 1.0, str(tmp_path), None, False, "fine", True, "demo"):
        h = c.model.high_res
        assert (h.image_size, h.roi_grid, h.max_boxes) == (512, 128, bench.MG_LLAVA_BOXES)
        assert c.input.image_size == 512 and c.input.max_len == 256 + bench.MG_LLAVA_BOXES
        assert c.model.projector.num_partial == 8 and c.shapes.image_size == 128
    plain = bench.stage_configs(p, 0, 1.0, str(tmp_path), None, False, "fine", budget=16)
    assert len(plain) == 1 and plain[0].model.get("high_res") is None and plain[0].input.image_size == 128
    assert plain[0].input.max_len == bench.CAPTION_TEXT["fine"] + 16
    assert not any("tower" in k for k in plain[0].trainable)  # the caption schedule freezes the tower


def test_ablations_run_at_the_smallest_budget_unless_named():
    cells = bench.plan_cells((16, 64), bench.FULL["variants"], "fine", ablations_everywhere=False)
    assert {v for v, t in cells if t == 64} == set(bench.FAMILIES)
    assert {v for v, t in cells if t == 16} == set(bench.FAMILIES + bench.ABLATIONS)
    named = bench.plan_cells((16, 64), ("pargo_raster",), "fine", ablations_everywhere=True)
    assert named == [("pargo_raster", 16), ("pargo_raster", 64)]


def test_qformer_variants_run_their_stage_1_first(tmp_path):
    """X-Former, X-Former without reconstruction and BLIP-2: their stage 1 (the qformer objective,
    ``--qformer-steps`` long; the reconstruction weight 0 for ``_norecon``) comes before the schedule,
    which continues from its projector; ``_norecon`` is not taken for a duplicate of ``xformer``."""
    cells = bench.plan_cells((32,), bench.XFORMER_ABLATION, "fine", ablations_everywhere=True)
    assert cells == [("xformer", 32), ("xformer_norecon", 32), ("blip2", 32)]
    for variant, recon in (("xformer", 1.0), ("xformer_norecon", 0.0), ("blip2", 1.0)):
        p = bench.projector_options(variant, 32)
        stage1, caption = bench.stage_configs(p, 0, 1.0, str(tmp_path), None, False, "fine", budget=32,
                                              variant=variant, qformer_steps=7)  # fmt: skip
        assert stage1.objective.name == "qformer" and stage1.objective.recon == recon
        assert stage1.total_steps == 7 and stage1.model.projector.num_queries == 32
        assert caption.objective.name == "lm" and "projector" in caption.checkpoint.init_from_parts
        mae = variant.startswith("xformer")
        assert all(bool(c.model.get("detail")) == mae for c in (stage1, caption))
        assert stage1.input.qformer_max_len == bench.CAPTION_TEXT["fine"] == caption.input.qformer_max_len
