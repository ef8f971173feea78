"""Training metrics: clu.metrics collections (aggregated on device between logs), writers (a
``metrics.jsonl`` line + TensorBoard scalars per log), and a one-line console progress report.

No TensorFlow: ``clu.metric_writers`` imports it, so TensorBoard events go through tensorboardX.
Only process 0 writes files on multi-host runs.

In the loop::

    writer, progress = MetricWriter(workdir), Progress(total_steps, every=c.log_every_steps,
                                                       tokens_per_step=batch * max_len)
    acc = None
    for step in ...:
        state, m = train_step(state, batch)     # m = TrainMetrics.single_from_model_output(loss=..)
        acc = m if acc is None else acc.merge(m)
        if step % every == 0:
            scalars = acc.compute() ; acc = None
            scalars |= progress.update(step, scalars)   # prints, returns timing scalars
            writer.write(step, scalars)
"""

# No `from __future__ import annotations`: clu.metrics reads the collection annotations as classes.
import json
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

import flax
import jax
import numpy as np
from clu import metrics as clu_metrics


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
    """Default train collection: means of ``loss``/``grad_norm`` over the steps between logs, last
    ``lr``. Build it in the step with ``TrainMetrics.single_from_model_output(loss=.., grad_norm=..,
    lr=..)`` and ``merge`` across steps; ``compute()`` gives a dict of scalars."""

    loss: clu_metrics.Average.from_output("loss")
    grad_norm: clu_metrics.Average.from_output("grad_norm")
    lr: clu_metrics.LastValue.from_output("lr")


def metrics_collection(
    average: tuple[str, ...] = ("loss", "grad_norm"), last: tuple[str, ...] = ("lr",)
) -> type[clu_metrics.Collection]:
    """A collection averaging the model outputs named in ``average`` and keeping the last value of
    those in ``last`` (e.g. ``average=("loss", "accuracy", "grad_norm")``)."""
    fields = {n: clu_metrics.Average.from_output(n) for n in average}
    fields.update({n: clu_metrics.LastValue.from_output(n) for n in last})
    return clu_metrics.Collection.create(**fields)


def _scalar(v: Any) -> float | int:
    x = np.asarray(jax.device_get(v))
    if x.size != 1:
        raise ValueError(f"Metric value of shape {x.shape} is not a scalar.")
    x = x.reshape(())
    return int(x) if np.issubdtype(x.dtype, np.integer) else float(x)


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in (d.to_dict() if hasattr(d, "to_dict") else d).items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) or hasattr(v, "to_dict"):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


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
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=30)

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

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Flattened (``a.b``) hyperparameters to ``{workdir}/hparams.json`` and a TensorBoard text."""
        if not self._active:
            return
        flat = {
            k: v if isinstance(v, (bool, int, float, str, type(None))) else str(v)
            for k, v in _flat(hparams).items()
        }
        with open(os.path.join(self.workdir, "hparams.json"), "w") as f:
            json.dump(flat, f, indent=1, sort_keys=True)
        if self._tb is not None:
            table = "| key | value |\n|---|---|\n" + "".join(
                f"| {k} | {v} |\n" for k, v in sorted(flat.items())
            )
            self._tb.add_text("hparams", table, 0)
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


def _fmt_value(key: str, v: float) -> str:
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
        parts += [f"{k} {_fmt_value(k, _scalar(v))}" for k, v in (scalars or {}).items()]
        if "s_per_step" in timing:
            parts.append(f"{timing['s_per_step']:.3g} s/step")
        if "tokens_per_s" in timing:
            parts.append(f"{timing['tokens_per_s']:.0f} tok/s")
        if "eta_s" in timing:
            parts.append(f"ETA {_fmt_duration(timing['eta_s'])}")
        print(" | ".join(parts), file=self._file or sys.stdout, flush=True)
        return timing
