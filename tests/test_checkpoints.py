"""Orbax checkpoints: sharded round trip, keep-last-K, data state, partial restore, tmp dirs, SIGTERM."""

from __future__ import annotations

import os
import signal
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pargo_jax import optim, sharding
from pargo_jax.checkpoints import Checkpointer, install_preemption_handler, restore_subtree


@struct.dataclass
class State:
    step: jax.Array
    params: Any
    opt_state: Any


def _state(mesh, seed=0):
    rng = np.random.RandomState(seed)
    params = {
        "projector": {"kernel": rng.randn(8, 4).astype(np.float32), "bias": rng.randn(4).astype(np.float32)},
        "llm": {"embed": rng.randn(16, 8).astype(np.float32)},
    }
    specs = {"projector": {"kernel": P("fsdp", None), "bias": P()}, "llm": {"embed": P("data", "fsdp")}}
    params = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params, specs)
    tx, _ = optim.make_optimizer(dict(lr=1e-3, schedule="constant"), params, {"projector/.*": 1.0})
    return State(step=jnp.asarray(seed, jnp.int32), params=params, opt_state=tx.init(params))


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh({"data": 2, "fsdp": 4})


def _assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        if hasattr(x, "sharding") and hasattr(y, "sharding"):
            assert x.sharding.is_equivalent_to(y.sharding, x.ndim), (x.sharding, y.sharding)


def test_round_trip_keep_and_data_state(tmp_path, mesh):
    ckpt = Checkpointer(str(tmp_path), every_steps=2, keep=2)
    assert ckpt.latest_step() is None
    assert ckpt.should_save(2) and not ckpt.should_save(3)
    states = {}
    for step in range(1, 7):
        states[step] = _state(mesh, seed=step)
        saved = ckpt.save(step, states[step], {"iterator": {"next_batch": step * 10, "skipped": {"a": 1}}})
        assert saved == (step % 2 == 0)
    assert ckpt.save(7, _state(mesh, seed=7), {"iterator": {"next_batch": 70}}, force=True)
    ckpt.wait()
    assert ckpt.latest_step() == 7 and ckpt.all_steps() == [6, 7]
    ckpt.close()

    ckpt = Checkpointer(str(tmp_path), every_steps=2, keep=2)
    restored, data = ckpt.restore(6, _abstract(_state(mesh)))
    _assert_same(restored, states[6])
    assert isinstance(restored, State)
    assert restored.params["llm"]["embed"].sharding.spec == P("data", "fsdp")
    assert data == {"iterator": {"next_batch": 60, "skipped": {"a": 1}}}
    latest, data = ckpt.restore(None, _abstract(_state(mesh)))
    assert int(latest.step) == 7 and data["iterator"]["next_batch"] == 70
    ckpt.close()


def test_partial_tmp_checkpoint_is_ignored(tmp_path, mesh):
    ckpt = Checkpointer(str(tmp_path), every_steps=1, keep=3, async_save=False)
    state = _state(mesh, seed=3)
    ckpt.save(3, state, {"n": 3})
    ckpt.close()
    # A save killed half way leaves orbax's temporary directory (renamed to "5" only on commit).
    tmp = tmp_path / "checkpoints" / "5.orbax-checkpoint-tmp-1700000000000000"
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "garbage").write_text("partial")
    # Neither the read-only discovery of restore_subtree nor a Checkpointer takes it for a step.
    sub = restore_subtree(str(tmp_path), _abstract(state.params), "params")
    _assert_same(sub, state.params)
    ckpt = Checkpointer(str(tmp_path), every_steps=1)
    assert ckpt.latest_step() == 3 and ckpt.all_steps() == [3]
    restored, data = ckpt.restore(None, _abstract(state))
    _assert_same(restored, state)
    assert data == {"n": 3}
    assert not ckpt.save(3, state, {"n": 3}, force=True)  # already saved: no-op
    ckpt.close()


def test_restore_subtree(tmp_path, mesh):
    ckpt = Checkpointer(str(tmp_path), every_steps=1, async_save=False)
    state = _state(mesh, seed=5)
    ckpt.save(5, state, {})
    ckpt.close()
    other = _abstract(_state(mesh).params["projector"])
    other["kernel"] = jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=NamedSharding(mesh, P(None, "fsdp")))
    for where in (tmp_path, tmp_path / "checkpoints", tmp_path / "checkpoints" / "5"):
        sub = restore_subtree(str(where), other, "params/projector")
        assert set(sub) == {"kernel", "bias"}
        np.testing.assert_array_equal(sub["kernel"], state.params["projector"]["kernel"])
        assert sub["kernel"].sharding.spec == P(None, "fsdp")  # resharded onto the new layout
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        restore_subtree(str(tmp_path / "nothing_here"), other, "params/projector")


def test_sigterm_sets_flag():
    previous = signal.getsignal(signal.SIGTERM)
    try:
        should_stop = install_preemption_handler()
        assert not should_stop(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert should_stop(2) and should_stop()
    finally:
        signal.signal(signal.SIGTERM, previous)
