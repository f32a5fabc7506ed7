"""Test setup: 8 fake CPU devices (before jax is imported), strict rank promotion, compile cache."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as gqlm/__init__.py, before numpy loads

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/gqlm/jax_cache_tests"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
