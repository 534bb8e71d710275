"""Test-wide setup: 8 fake CPU devices (multi-device tests) and the persistent compilation cache."""

import os

# Must happen before jax is imported anywhere in the test process.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu (TPU AOT tests) guards against two processes with a lockfile; xdist workers only compile.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("MHC_JAX_DATA_DIR", os.path.join(os.path.expanduser("~"), ".cache", "mhc_jax", "tfds-tests"))

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("JAX_COMPILATION_CACHE_DIR",
                                 os.path.join(os.path.expanduser("~"), ".cache", "mhc_jax", "jax-cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data", "tinyshakespeare.txt")


@pytest.fixture
def shakespeare_path() -> str:
    if not os.path.isfile(SHAKESPEARE):
        pytest.fail(f"{SHAKESPEARE} is missing: the tests expect ../shared beside the checkout")
    return SHAKESPEARE
