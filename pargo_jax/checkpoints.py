"""Orbax checkpoints of the train state + data-iterator state: periodic save, keep-last-K, resume onto
the mesh, partial restore for ``init_from``, and a preemption (SIGTERM) flag.

Layout: ``{workdir}/checkpoints/{step}/state`` (the train-state pytree, OCDBT/tensorstore arrays) and
``{workdir}/checkpoints/{step}/data`` (JSON: the data iterator's ``get_state()`` plus anything small).
Orbax writes a step into ``{step}.orbax-checkpoint-tmp-*`` and renames it on commit (on GCS it writes a
``commit_success`` marker instead), so a save cut off half way is never listed by :meth:`latest_step`
and never restored.

Typical loop::

    ckpt = Checkpointer(workdir, every_steps=c.checkpoint.every_steps, keep=c.checkpoint.keep)
    stop = install_preemption_handler()
    if (step := ckpt.latest_step()) is not None:
        state, data_state = ckpt.restore(step, abstract_state)   # abstract_state carries shardings
        it.set_state(data_state["iterator"])
    for step in ...:
        ...
        preempted = stop(step)
        ckpt.save(step, state, {"iterator": it.get_state()}, force=preempted or step == total)
        if preempted:
            break
    ckpt.close()
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from pargo_jax import paths

STATE, DATA = "state", "data"


class Checkpointer:
    """A ``CheckpointManager`` at ``{workdir}/checkpoints`` saving every ``every_steps`` steps and
    keeping the last ``keep``; ``async_save`` overlaps writing with training (call :meth:`wait` or
    :meth:`close` before reading the files)."""

    def __init__(self, workdir: str, *, every_steps: int, keep: int = 3, async_save: bool = True):
        if every_steps < 1:
            raise ValueError(f"checkpoint every_steps={every_steps} must be >= 1.")
        self.every_steps = int(every_steps)
        self.directory = paths.path(workdir) / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=every_steps,
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={STATE: ocp.StandardCheckpointHandler(), DATA: ocp.JsonCheckpointHandler()},
        )

    def latest_step(self) -> int | None:
        """The newest finished checkpoint's step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        """True when ``step`` is a multiple of ``every_steps`` and newer than the latest checkpoint."""
        latest = self.latest_step()
        return step % self.every_steps == 0 and (latest is None or step > latest)

    def save(self, step: int, state: Any, data_state: Mapping[str, Any], *, force: bool = False) -> bool:
        """Saves (asynchronously) if :meth:`should_save`, or with ``force`` any step newer than the latest
        checkpoint (a forced save of an already saved step is a no-op); returns whether it saved."""
        latest = self.latest_step()
        if not (self.should_save(step) or (force and (latest is None or step > latest))):
            return False
        args = ocp.args.Composite(
            **{STATE: ocp.args.StandardSave(state), DATA: ocp.args.JsonSave(dict(data_state))}
        )
        return bool(self._manager.save(step, args=args, force=True))

    def restore(self, step: int | None, abstract_state: Any) -> tuple[Any, dict]:
        """``(state, data_state)`` of ``step`` (None: the latest). ``abstract_state`` is a pytree of
        ``jax.ShapeDtypeStruct`` with ``sharding`` set, so every array lands directly on the mesh."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No finished checkpoint in {self.directory} to restore.")
        args = ocp.args.Composite(
            **{STATE: ocp.args.StandardRestore(abstract_state), DATA: ocp.args.JsonRestore()}
        )
        out = self._manager.restore(step, args=args)
        return out[STATE], dict(out[DATA] or {})

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def step_dir(path: str | epath.Path, step: int | None = None) -> epath.Path:
    """The directory of checkpoint ``step`` (None: the newest finished one) from a run's workdir, its
    ``checkpoints/`` directory or a step directory (holding ``state/``); FileNotFoundError names the
    path and the steps it does hold."""
    p = paths.path(path)
    if (p / STATE).is_dir():
        return p
    root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    steps = sorted(ocp.step.checkpoint_steps(root)) if root.is_dir() else []
    if step is None and steps:
        step = steps[-1]
    if step not in steps:
        have = f"it holds steps {steps}" if steps else "it holds no finished checkpoint"
        which = f" of step {step}" if step is not None else ""
        raise FileNotFoundError(
            f"No checkpoint{which} at {str(path)!r} ({have}): pass a trained run's workdir, its "
            "checkpoints/ directory or a step directory (containing state/)."
        )
    return ocp.step.find_step_path(root, ocp.step.standard_name_format(), step=step)


def restore_subtree(path_or_workdir: str, abstract_subtree: Any, select: str, step: int | None = None) -> Any:
    """Restores only the part of a saved train state at ``select``, a ``/``-joined key path into the
    state (e.g. ``"params/projector"``), shaped and sharded like ``abstract_subtree`` (a pytree of
    ``jax.ShapeDtypeStruct`` with shardings). Nothing else of the checkpoint is read, so an SFT run can
    ``init_from`` a pretraining run's projector without loading its (frozen) LLM or optimizer state.

    ``path_or_workdir``: another run's workdir, its ``checkpoints/`` dir, or one step directory;
    ``step``: which checkpoint (None: the newest)."""
    directory = step_dir(path_or_workdir, step)
    keys = [k for k in select.strip("/").split("/") if k]
    if not keys:
        raise ValueError("restore_subtree needs a non-empty select path such as 'params/projector'.")
    target: Any = abstract_subtree
    for k in reversed(keys):
        target = {k: target}
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    with ocp.PyTreeCheckpointer() as ckptr:
        try:
            out = ckptr.restore(
                directory / STATE,
                args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True),
            )
        except (KeyError, ValueError) as e:
            raise ValueError(f"Checkpoint {directory} has no state subtree {select!r} matching: {e}") from e
    for k in keys:
        out = out[k]
    missing = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path(out)
               if isinstance(x, jax.ShapeDtypeStruct)]  # fmt: skip
    if missing:  # partial_restore hands back the placeholders of what the checkpoint lacks
        raise ValueError(f"Checkpoint {directory} has no {select}{missing[0]} (and {len(missing) - 1} more).")
    return out


def install_preemption_handler(*, sigint: bool = False) -> Callable[..., bool]:
    """Catches SIGTERM (and SIGINT with ``sigint``) and returns ``should_stop(step=None) -> bool``.

    Single process: True once a signal arrived; the loop saves a checkpoint and exits cleanly. Several
    processes: every process must stop at the same step, so ``should_stop(step)`` asks JAX's preemption
    sync service (``multihost_utils.reached_preemption_sync_point``, set up by
    ``jax.distributed.initialize``) and returns the same answer on all hosts; there ``step`` is
    required and the call must be made by every process at every step."""
    flag = threading.Event()

    def handler(signum, frame):
        del frame
        flag.set()
        print(f"Received signal {signal.Signals(signum).name}: will checkpoint and stop.", flush=True)

    signal.signal(signal.SIGTERM, handler)
    if sigint:
        signal.signal(signal.SIGINT, handler)

    def should_stop(step: int | None = None) -> bool:
        if jax.process_count() > 1:
            if step is None:
                raise ValueError("should_stop(step) needs the step on multi-process runs.")
            from jax.experimental import multihost_utils

            return bool(multihost_utils.reached_preemption_sync_point(step))
        return flag.is_set()

    should_stop.flag = flag  # type: ignore[attr-defined]
    return should_stop
