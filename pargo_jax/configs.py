"""Config checks shared by every section, and a run's saved config.

``check_keys`` is the one validator of user-facing option dicts (config sections, loader options,
dataclass fields): unknown keys fail with one line naming them. ``dataclass_from`` builds a frozen
config dataclass from such a dict. ``save_run_config`` / ``load_run_config`` keep the experiment
config of a run as ``{workdir}/config.json`` (what predict, evaluate and export start from).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def check_keys(given: Iterable[str], allowed: Iterable[str], where: str) -> None:
    """Raises ``ValueError`` naming every key of ``given`` not in ``allowed`` (with a close match)."""
    allowed = sorted(set(allowed))
    bad = sorted(set(given) - set(allowed))
    if not bad:
        return
    hints = {k: difflib.get_close_matches(k, allowed, n=1) for k in bad}
    named = ", ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items())
    raise ValueError(f"Unknown key(s) {named} in {where}; valid keys are {allowed}.")


def field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def dataclass_from(cls: type[T], options: Mapping[str, Any], where: str) -> T:
    """``cls(**options)`` after :func:`check_keys` against the dataclass fields."""
    options = dict(options.to_dict() if hasattr(options, "to_dict") else options)
    check_keys(options, field_names(cls), where)
    return cls(**options)


def require_path(path: str | None, what: str) -> str:
    """Local paths must exist; remote ones (gs://, s3://) are left to their readers."""
    if not path or ("://" not in path and not os.path.exists(path)):
        raise FileNotFoundError(f"{what} path {path!r} does not exist; set it in the config (or --config.*).")
    return path


CONFIG_FILE = "config.json"


def save_run_config(config, workdir: str) -> None:
    """Writes ``config`` (an ml_collections ConfigDict) to ``{workdir}/config.json``."""
    from etils import epath

    path = epath.Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(config.to_json_best_effort(indent=2) + "\n")


def load_run_config(workdir: str):
    """The ConfigDict a run saved in ``{workdir}/config.json``; FileNotFoundError names the workdir."""
    import ml_collections
    from etils import epath

    path = epath.Path(workdir) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"No {CONFIG_FILE} in {workdir!r}: pass the --workdir of a training run "
            "(python -m pargo_jax.main writes it when it starts)."
        )
    return ml_collections.ConfigDict(json.loads(path.read_text()), allow_dotted_keys=True)
