"""Test-session setup.

Four virtual CPU devices are created before JAX is imported so that data-parallel code can be tested
in-process (single-device code is unaffected: jit places computations on device 0 by default).
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
