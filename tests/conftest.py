"""Test-session setup.

Four virtual CPU devices are created before JAX is imported so that data-parallel code can be tested
in-process (single-device code is unaffected: jit places computations on device 0 by default).
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# Every training run builds fresh jitted step functions; identical programs are then served from JAX's
# persistent compilation cache instead of being compiled again (one cache per test session).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxdp-test-xla-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# Benchmarks write dated measurement records (jaxdp_study.measurements); a test's records go to a temporary
# directory, never into the repository's docs/measurements/.
if "JAXDP_MEASUREMENTS_DIR" not in os.environ:
    import tempfile

    os.environ["JAXDP_MEASUREMENTS_DIR"] = tempfile.mkdtemp(prefix="jaxdp-test-measurements-")
