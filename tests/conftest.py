"""Test setup: 8 fake CPU devices and a persistent compile cache, set before jax is imported."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ["XLA_FLAGS"] += (
    "" if "device_count" in os.environ["XLA_FLAGS"] else " --xla_force_host_platform_device_count=8"
)
# Tests are compile-bound on 2 cores: skip LLVM's expensive optimizations (numerics are unchanged).
os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".jax_cache")
)

import jax  # noqa: E402

jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
