"""The packing benchmark's command, ``--quick`` (demo shape, 300 records, 2 timed steps each): it prints
the table and writes JSON whose packed row carries more samples per step and less padding than the
one-sample row from the same records, and the length mix it draws is a pure function of the seed."""

import json

import numpy as np
import pytest

from pargo_jax.benchmarks import packing
from tests import procs


@pytest.mark.slow  # the command in a subprocess: the stack's import and two train steps compiled
def test_quick_run_prints_the_table_and_writes_json(tmp_path):
    out = tmp_path / "packing.json"
    res = procs.run("pargo_jax.benchmarks.packing", "--quick", "--out", str(out), devices=1)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "| demo | packed | 16 x 128 | 4 |" in res.stdout and "non-pad tokens/s" in res.stdout
    rows = json.loads(out.read_text())["rows"]
    one, packed = rows
    assert not one["packed"] and packed["packed"] and len(one["step_seconds_all"]) == 2
    assert packed["samples_per_step"] > 2 * one["samples_per_step"] == 32  # rows hold several samples
    assert packed["padding"] < one["padding"] / 2 and packed["epoch_steps"] < one["epoch_steps"] / 2
    assert packed["tokens_per_second"] > 0 and packed["plan_seconds_per_batch"] > 0


def test_the_length_mix_is_seeded_and_long_tailed():
    a, b = packing.draw(2000, 0.1, seed=0), packing.draw(2000, 0.1, seed=0)
    assert a == b and a != packing.draw(2000, 0.1, seed=1)
    words = np.array([sum(turns) for _, _, turns in a])
    text_only = sum(images == 0 for _, images, _ in a) / len(a)
    assert 0.03 < text_only < 0.09  # ShareGPT: 40K of 665K
    assert np.percentile(words, 99) > 4 * np.median(words)  # the long tail
