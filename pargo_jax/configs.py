"""Config checks shared by every section, and a run's saved config.

``check_keys`` is the one validator of user-facing option dicts (config sections, loader options,
dataclass fields): unknown keys fail with one line naming them. A user's mistake in a config raises
:class:`ConfigError` (``pargo_jax.launcher`` prints it as one line, no traceback).
``dataclass_from`` builds a frozen config dataclass from such a dict. ``save_run_config`` /
``load_run_config`` keep the experiment config of a run as ``{workdir}/config.json`` (what
predict, evaluate and export start from).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A user's mistake in a config (unknown key, unknown preset, missing path): its message is the
    one line the command prints (``pargo_jax.launcher``), naming the field and the fix."""


class ConfigPathError(ConfigError, FileNotFoundError):
    """A path a config names does not exist (still a ``FileNotFoundError`` to callers)."""


def close_match(key: str, allowed: Iterable[str]) -> str | None:
    """The entry of ``allowed`` that ``key`` most likely misspells, if any."""
    found = difflib.get_close_matches(key, list(allowed), n=1)
    return found[0] if found else None


def check_keys(given: Iterable[str], allowed: Iterable[str], where: str) -> None:
    """Raises :class:`ConfigError` naming every key of ``given`` not in ``allowed`` (with a close match)."""
    allowed = sorted(set(allowed))
    bad = sorted(set(given) - set(allowed))
    if not bad:
        return
    hints = {k: close_match(k, allowed) for k in bad}
    named = ", ".join(f"{k!r}" + (f" (did you mean {h!r}?)" if h else "") for k, h in hints.items())
    raise ConfigError(f"Unknown key(s) {named} in {where}; valid keys are {allowed}.")


def missing_field(config: Any, path: str, root: str = "config") -> str | None:
    """Why ``root.path`` (dotted) names no field of ``config``, e.g. ``no field 'lrr' in config.optim;
    did you mean 'lr'?``; None when it does."""
    node, where = config, root
    for key in path.split("."):
        if not hasattr(node, "keys"):
            return f"{where} is a {type(node).__name__}, not a section"
        if key not in node:
            hint = close_match(key, node.keys())
            return f"no field {key!r} in {where}" + (f"; did you mean {hint!r}?" if hint else "")
        node, where = node[key], f"{where}.{key}"
    return None


def field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def dataclass_from(cls: type[T], options: Mapping[str, Any], where: str) -> T:
    """``cls(**options)`` after :func:`check_keys` against the dataclass fields."""
    options = dict(options.to_dict() if hasattr(options, "to_dict") else options)
    check_keys(options, field_names(cls), where)
    return cls(**options)


def require_path(path: str | None, what: str) -> str:
    """Local paths must exist (else :class:`ConfigPathError`); remote ones (gs://, s3://) are left to
    their readers."""
    if not path or ("://" not in path and not os.path.exists(path)):
        raise ConfigPathError(f"{what} path {path!r} does not exist; set it in the config (or --config.*).")
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
