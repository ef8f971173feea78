"""How every command starts: its ``if __name__ == "__main__":`` block calls :func:`run` (absl flags)
or, for the benchmarks' argparse, :func:`run_argparse`. In order:

1. :func:`pargo_jax.process_setup.prepare_process` (glibc keeps freed memory, XLA's compile cache),
   before jax starts a backend;
2. the flags are parsed (:func:`parse_flags`): a user's mistake (an unknown flag, a bad value, a
   ``--config.*`` field that does not exist, an unknown preset) is one line on stderr,
   ``error: ...`` naming it and the fix, and exit status 2;
3. orbax's per-save INFO chatter stays off the console (:class:`QuietLibraries`);
4. ``main`` runs: a :class:`~pargo_jax.configs.ConfigError` it raises (a config that loads but is
   wrong: an unknown key, a missing path) is one line and exit status 2 too. Every other exception
   keeps its whole traceback: that is a bug, to debug.
"""

from __future__ import annotations

import argparse
import functools
import logging as std_logging
import sys
import traceback
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NoReturn

from absl import flags

from pargo_jax import configs
from pargo_jax.process_setup import prepare_process

USAGE_ERROR = 2  # exit status of a user's mistake (argparse's too)


def fail(message: str) -> NoReturn:
    """``error: message`` as one line on stderr; exit status :data:`USAGE_ERROR`."""
    print("error: " + " ".join(message.split("\n")), file=sys.stderr, flush=True)
    raise SystemExit(USAGE_ERROR)


def config_error(e: BaseException) -> configs.ConfigError | None:
    """The innermost ConfigError among ``e`` and its causes (ml_collections re-raises a config file's
    error as a new one of the same type, its traceback in the message); None if there is none."""
    found, seen = None, set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, configs.ConfigError):
            found = e
        e = e.__cause__ or e.__context__
    return found


def flag_error(e: flags.Error) -> str | None:
    """The one line of a flag mistake: absl's own message, or ``--flag=value: why`` for a config file's
    ConfigError; None for a config file that failed otherwise (a bug: its traceback shows)."""
    text = str(e)
    cause = config_error(e)
    if cause is None:
        return None if "\n" in text else text
    if text.startswith("flag --"):  # absl's "flag --name=value: message"
        return f"{text.removeprefix('flag ').partition(': ')[0]}: {cause}"
    return str(cause)


def unloaded(name: str, config: Any) -> str | None:
    """``--name: why`` when ``config`` stands for a config file that failed to load (ml_collections
    defers an OSError of its loading to the config's first use, deep in a command); else None."""
    if type(config).__name__ != "_ErrorConfig":
        return None
    error = config._error
    last = [line.strip() for line in str(error).splitlines() if line.strip()][-1]
    return f"--{name}: {config_error(error) or last}"


def bad_override(e: BaseException) -> str | None:
    """``--config.a.b: no field 'b' in config.a; did you mean ...`` for a ``--config.*`` override naming
    no field (ml_collections fails with a bare AttributeError / KeyError, or an OSError if the file did
    not load, while its config flag parses: that frame holds the config and the overrides); None if
    ``e`` is not that."""
    for frame, _ in traceback.walk_tb(e.__traceback__):
        found = frame.f_locals
        owner = found.get("self")
        if isinstance(owner, flags.Flag) and "config" in found and "overrides" in found:
            why = unloaded(owner.name, found["config"])
            for path in found["overrides"]:
                why = why or configs.missing_field(found["config"], path, owner.name)
                if why:
                    return why if why.startswith("--") else f"--{owner.name}.{path}: {why}"
    return None


def parse_flags(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
    """``flag_values(argv)`` (``argv[0]`` is the program), the arguments left; a user's mistake exits
    with one line (:func:`fail`). absl's ``app.run`` takes it as its ``flags_parser``."""
    try:
        left = flag_values(list(argv))
        message = next(filter(None, (unloaded(n, flag_values[n].value) for n in flag_values)), None)
        if message is None:
            return left
    except flags.Error as e:
        message = flag_error(e)
        if message is None:
            raise
    except (AttributeError, KeyError, OSError) as e:
        message = bad_override(e)
        if message is None:
            raise
    fail(message)


def parse(
    define: Callable[[flags.FlagValues], None], args: Sequence[str], prog: str = "cmd"
) -> flags.FlagValues:
    """A command's flags (``define`` declares them) parsed from ``args`` (no program name) apart from
    absl's global ``FLAGS``: how a test runs a command in its own process."""
    values = flags.FlagValues()
    define(values)
    parse_flags([prog, *args], values)
    return values


def reporting_config_errors(main: Callable[..., Any]) -> Callable[..., Any]:
    """``main`` whose :class:`~pargo_jax.configs.ConfigError` is one line and exit status 2."""

    @functools.wraps(main)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except configs.ConfigError as e:
            fail(str(e))

    return wrapped


class QuietLibraries(std_logging.Filter):
    """Drops orbax's per-save INFO chatter from the console; warnings and errors still show."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def _quiet_libraries() -> None:
    from absl import logging

    logging.get_absl_handler().addFilter(QuietLibraries())


def run(main: Callable[[list[str]], Any], *, required: Iterable[str] = ()) -> None:
    """A command: process set-up, absl's ``app.run(main)`` with :func:`parse_flags`, ``required``
    flags marked, ConfigErrors of ``main`` as one line. Does not return."""
    prepare_process()
    from absl import app

    flags.mark_flags_as_required(list(required))
    _quiet_libraries()
    app.run(reporting_config_errors(main), flags_parser=parse_flags)


class ArgumentParser(argparse.ArgumentParser):
    """argparse (the benchmarks' flags) whose mistakes are one line, as :func:`parse_flags`'s."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (--help lists the flags)")


def run_argparse(main: Callable[[], Any], *, setup: Callable[[], None] | None = None) -> None:
    """An argparse command (``main()`` parses ``sys.argv`` with an :class:`ArgumentParser`): process
    set-up, then ``setup`` (more of it, before jax starts), then ``main`` as :func:`run` does."""
    prepare_process()
    if setup is not None:
        setup()
    _quiet_libraries()
    reporting_config_errors(main)()
