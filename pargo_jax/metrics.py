"""Training metrics out: a ``metrics.jsonl`` line + TensorBoard scalars per log, and a one-line console
progress report, and the ``clu.metrics`` collection a training step returns (merged on device
between logs).

No TensorFlow: ``clu.metric_writers`` imports it, so TensorBoard events go through tensorboardX.
Only process 0 writes files on multi-host runs.
"""

import json
import sys
import time
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics as clu_metrics

from pargo_jax import paths


@flax.struct.dataclass
class Sum(clu_metrics.Metric):
    """A clu metric summing a value over the steps between two logs."""

    total: jax.Array

    @classmethod
    def from_model_output(cls, values: jax.Array, **_) -> "Sum":
        return cls(total=jnp.sum(values))

    def merge(self, other: "Sum") -> "Sum":
        return type(self)(total=self.total + other.total)

    def compute(self) -> jax.Array:
        return self.total


@flax.struct.dataclass
class Max(Sum):
    """A clu metric keeping the largest value over the steps between two logs (in ``total``)."""

    @classmethod
    def from_model_output(cls, values: jax.Array, **_) -> "Max":
        return cls(total=jnp.max(values))

    def merge(self, other: "Max") -> "Max":
        return type(self)(total=jnp.maximum(self.total, other.total))


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
    """What a step reports, merged on device between logs: mean loss and grad norm, the last learning
    rate, the number of steps skipped for non-finite values and the longest run of consecutive ones
    (which stops training at ``max_nonfinite_steps``)."""

    loss: clu_metrics.Average.from_output("loss")
    grad_norm: clu_metrics.Average.from_output("grad_norm")
    lr: clu_metrics.LastValue.from_output("lr")
    skipped_nonfinite: Sum.from_output("skipped_nonfinite")
    nonfinite_streak: Max.from_output("nonfinite_streak")


def train_metrics(parts: tuple[str, ...] = ()) -> type[clu_metrics.Collection]:
    """:class:`TrainMetrics`, plus the mean of each loss part ``p`` (model output ``loss_p``, written as
    ``loss/p`` by :func:`metric_name`)."""
    if not parts:
        return TrainMetrics
    extra = {f"loss_{p}": clu_metrics.Average.from_output(f"loss_{p}") for p in parts}
    return clu_metrics.Collection.create(**TrainMetrics.__annotations__, **extra)


def metric_name(key: str) -> str:
    """The written name of a collection field: ``loss_itc`` -> ``loss/itc``."""
    return "loss/" + key.removeprefix("loss_") if key.startswith("loss_") else key


def _scalar(v: Any) -> float | int:
    x = np.asarray(jax.device_get(v))
    if x.size != 1:
        raise ValueError(f"Metric value of shape {x.shape} is not a scalar.")
    x = x.reshape(())
    return int(x) if np.issubdtype(x.dtype, np.integer) else float(x)


class MetricWriter:
    """Appends ``{"step": s, **scalars}`` to ``{workdir}/metrics.jsonl`` (flushed each call) and, with
    ``tensorboard``, writes TensorBoard scalars to ``{workdir}/tensorboard``."""

    def __init__(self, workdir: str, *, tensorboard: bool = True):
        self.workdir = workdir
        self._active = jax.process_index() == 0
        self._jsonl = None
        self._tb = None
        if not self._active:
            return
        self._jsonl = paths.AppendFile(paths.join(workdir, "metrics.jsonl"))
        if tensorboard:
            from tensorboardX import SummaryWriter

            paths.register_tensorboard()
            self._tb = SummaryWriter(paths.join(workdir, "tensorboard"), flush_secs=30)

    def write(self, step: int, scalars: Mapping[str, Any]) -> None:
        if not self._active:
            return
        values = {k: _scalar(v) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, int(step))
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _fmt_duration(seconds: float) -> str:
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def format_value(key: str, v: float) -> str:
    """A scalar for the console: learning rates in e-notation, others with 4 significant digits."""
    if "lr" in key.split("/")[-1] or "learning_rate" in key:
        return f"{v:.1e}"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class Progress:
    """Console progress every ``every`` steps::

        step 120/1000 | loss 2.314 | lr 3.0e-04 | 1.23 s/step | 812 tok/s | ETA 18m02s

    :meth:`update` returns the timing scalars (``s_per_step``, ``tokens_per_s`` when
    ``tokens_per_step`` is known, ``eta_s``) measured since the previous report."""

    def __init__(self, total_steps: int, every: int, *, tokens_per_step: int | None = None, file=None):
        self.total_steps, self.every, self.tokens_per_step = (
            int(total_steps),
            max(int(every), 1),
            tokens_per_step,
        )
        self._file = file
        self._last: tuple[int, float] | None = None

    def should_report(self, step: int) -> bool:
        return step % self.every == 0 or step == self.total_steps

    def start(self, step: int) -> None:
        """Marks the timing origin (e.g. after the first compiled step or a restore)."""
        self._last = (int(step), time.perf_counter())

    def update(self, step: int, scalars: Mapping[str, Any] | None = None, *, force: bool = False) -> dict:
        """Prints the line when :meth:`should_report` (or ``force``); returns timing scalars ({} when
        nothing was printed or no timing origin exists yet)."""
        if not (force or self.should_report(step)):
            return {}
        now = time.perf_counter()
        timing: dict[str, float] = {}
        if self._last is not None and step > self._last[0]:
            sps = (now - self._last[1]) / (step - self._last[0])
            timing["s_per_step"] = sps
            if self.tokens_per_step:
                timing["tokens_per_s"] = self.tokens_per_step / sps
            timing["eta_s"] = sps * max(self.total_steps - step, 0)
        self._last = (int(step), now)
        parts = [f"step {step}/{self.total_steps}"]
        parts += [f"{k} {format_value(k, _scalar(v))}" for k, v in (scalars or {}).items()]
        if "s_per_step" in timing:
            parts.append(f"{timing['s_per_step']:.3g} s/step")
        if "tokens_per_s" in timing:
            parts.append(f"{timing['tokens_per_s']:.0f} tok/s")
        if "eta_s" in timing:
            parts.append(f"ETA {_fmt_duration(timing['eta_s'])}")
        print(" | ".join(parts), file=self._file or sys.stdout, flush=True)
        return timing
