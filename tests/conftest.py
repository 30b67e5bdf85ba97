"""Test set-up: every test process gets 8 fake CPU devices before JAX initialises."""
import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (must come after the flags)

jax.config.update("jax_default_matmul_precision", "highest")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng(request):
    """A fresh numpy Generator per test, seeded from the test's node id (reproducible, not constant across tests)."""
    import zlib
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
