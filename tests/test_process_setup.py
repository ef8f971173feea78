"""``pargo_jax.process_setup``: where the compile cache lives, what a command's set-up changes in jax, and
the fake device count of a child process (the other XLA flags kept)."""

from __future__ import annotations

import os

import jax
import pytest

from pargo_jax import process_setup


def test_compile_cache_dir_outside_the_checkout(monkeypatch, tmp_path):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert process_setup.compile_cache_dir() == os.path.join(str(tmp_path), "pargo_jax", "jax")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert process_setup.compile_cache_dir() == os.path.expanduser("~/.cache/pargo_jax/jax")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "mine"))  # the variable wins
    assert process_setup.compile_cache_dir() == str(tmp_path / "mine")


def test_use_compile_cache_sets_jax_and_the_environment(monkeypatch, tmp_path):
    before = {k: getattr(jax.config, k) for k in ("jax_compilation_cache_dir",
                                              "jax_persistent_cache_min_compile_time_secs",
                                              "jax_compilation_cache_max_size")}  # fmt: skip
    for name in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
                 "JAX_COMPILATION_CACHE_MAX_SIZE"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    try:
        path = process_setup.use_compile_cache()
        assert path == os.environ["JAX_COMPILATION_CACHE_DIR"] == jax.config.jax_compilation_cache_dir
        assert path.startswith(str(tmp_path))  # children inherit it through the environment
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.5
        assert jax.config.jax_compilation_cache_max_size == 4 << 30
    finally:
        for k, v in before.items():
            jax.config.update(k, v)


def test_host_device_flags_change_only_the_count():
    flags = "--xla_backend_optimization_level=0 --xla_force_host_platform_device_count=8 --xla_foo=1"
    out = process_setup.host_device_flags(flags, 2, "--xla_bar=3")
    assert out.split() == ["--xla_backend_optimization_level=0", "--xla_foo=1", "--xla_bar=3",
                           "--xla_force_host_platform_device_count=2"]  # fmt: skip
    assert process_setup.host_device_flags("", 1) == "--xla_force_host_platform_device_count=1"


def test_unaged_cache_entries_get_the_oldest_access_time(tmp_path):
    """An entry without its access-time file (written by a cache without a size cap) made every write
    of jax's size-capped cache fail; dated as the oldest, it is the first evicted."""
    from jax._src.lru_cache import LRUCache

    (tmp_path / "old-cache").write_bytes(b"x" * 10)
    cache = LRUCache(str(tmp_path), max_size=1000)
    with pytest.raises(FileNotFoundError):
        cache.put("new", b"y" * 5)
    assert process_setup.date_unaged_entries(str(tmp_path)) == 1
    assert process_setup.date_unaged_entries(str(tmp_path)) == 0  # once
    cache.put("new", b"y" * 5)
    cache.put("big", b"z" * 990)  # over the cap: the oldest goes first
    assert not (tmp_path / "old-cache").exists()
    assert cache.get("new") == b"y" * 5 and cache.get("big") == b"z" * 990
