"""What every ``python -m pargo_jax...`` command does first, before jax starts its threads.

- glibc keeps freed memory for reuse (:func:`pargo_jax.host_memory.keep_freed_memory`);
- XLA's compiled programs persist across runs in one cache outside any checkout
  (:func:`compile_cache_dir`), so a second run of the same shapes skips compiling.

``JAX_COMPILATION_CACHE_DIR`` wins when set (an empty value turns the cache off),
``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` (default here 0.5 s) sets which programs are kept and
``JAX_COMPILATION_CACHE_MAX_SIZE`` (default here 4 GiB, least recently used out first) its size.
"""

from __future__ import annotations

import os
import sys

from pargo_jax.host_memory import keep_freed_memory

MIN_COMPILE_SECONDS = "0.5"  # programs that compile faster are cheaper to rebuild than to read back
MAX_CACHE_BYTES = str(4 << 30)  # the whole test suite's programs take ~60 MB


def compile_cache_dir() -> str:
    """``$JAX_COMPILATION_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME`` (or ``~/.cache``)/pargo_jax/jax."""
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache_home, "pargo_jax", "jax")


def date_unaged_entries(path: str) -> int:
    """Gives every ``*-cache`` entry in ``path`` without its ``*-atime`` file (written by a jax without
    a size cap) the oldest access time; returns how many. jax's size-capped cache reads every entry's
    access time before it writes, and one missing file makes every write fail."""
    if not os.path.isdir(path):
        return 0
    names = set(os.listdir(path))
    unaged = [n.removesuffix("-cache") for n in names if n.endswith("-cache")]
    unaged = [key for key in unaged if f"{key}-atime" not in names]
    for key in unaged:
        with open(os.path.join(path, f"{key}-atime"), "wb") as f:
            f.write((0).to_bytes(8, "little"))
    return len(unaged)


def use_compile_cache() -> str:
    """Points jax (and every process this one starts) at :func:`compile_cache_dir`; returns it."""
    path = compile_cache_dir()
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", MIN_COMPILE_SECONDS)
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", MAX_CACHE_BYTES)
    if path and int(os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"]) != -1:
        date_unaged_entries(path)
    if "jax" in sys.modules:  # imported already: the environment is read only at import
        import jax

        jax.config.update("jax_compilation_cache_dir", path or None)
        jax.config.update(
            "jax_persistent_cache_min_compile_time_secs",
            float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
        )
        jax.config.update("jax_compilation_cache_max_size", int(os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"]))
    return path


def host_device_flags(xla_flags: str, n: int, extra_flags: str = "") -> str:
    """``xla_flags`` asking for ``n`` fake CPU devices instead of any count it named; ``extra_flags`` join."""
    flags = [f for f in xla_flags.split() if "host_platform_device_count" not in f]
    return " ".join([*flags, *extra_flags.split(), f"--xla_force_host_platform_device_count={n}"])


def set_host_device_count(n: int, extra_flags: str = "") -> None:
    """``n`` fake CPU devices for a jax not yet imported (:func:`host_device_flags` on ``XLA_FLAGS``)."""
    os.environ["XLA_FLAGS"] = host_device_flags(os.environ.get("XLA_FLAGS", ""), n, extra_flags)


def prepare_process() -> None:
    """The set-up of a command's ``__main__``: call it before ``import jax``."""
    keep_freed_memory()
    use_compile_cache()
