"""Test-wide setup: 8 fake CPU devices (multi-device tests) and the persistent compilation cache."""

import os
import sysconfig

# Must happen before jax is imported anywhere in the test process.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu (TPU AOT tests) guards against two processes with a lockfile; xdist workers only compile.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("MHC_JAX_DATA_DIR", os.path.join(os.path.expanduser("~"), ".cache", "mhc_jax", "tfds-tests"))

# The persistent compilation cache, as environment variables so that the processes tests start (train.py
# runs killed and resumed, notebook kernels) share it with the test process: a resumed run reuses the
# programs its first run compiled.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "mhc_jax", "jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402
import pytest  # noqa: E402

# Also set in this process explicitly, in case a pytest plugin imported jax before the lines above ran.
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# nanoGPT's corpus, present only in the project's own CI (../shared beside the checkout). Tests must pass
# without it: those that need real text read the stdlib text below; the few that are only meaningful on
# Tiny Shakespeare take the `shakespeare_path` fixture, which skips with a reason when it is absent.
SHAKESPEARE = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data", "tinyshakespeare.txt")
# Real text every CPython install ships: pydoc's help topics (the language reference as English prose,
# ~465k characters) and the module holding them, a plain UTF-8 file usable as `data.dataset=text:PATH`.
PROSE_FILE = os.path.join(sysconfig.get_paths()["stdlib"], "pydoc_data", "topics.py")


def stdlib_prose(max_chars: int | None = None) -> str:
    """pydoc's help topics in sorted order, paragraphs separated by blank lines: English prose, offline."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))[:max_chars]


@pytest.fixture(scope="session")
def prose_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """`stdlib_prose()` as a UTF-8 text file (a single-file corpus like Tiny Shakespeare)."""
    path = tmp_path_factory.mktemp("prose") / "pydoc_topics.txt"
    path.write_text(stdlib_prose(), encoding="utf-8")
    return str(path)


@pytest.fixture
def shakespeare_path() -> str:
    if not os.path.isfile(SHAKESPEARE):
        pytest.skip(f"skipped: ../shared (Tiny Shakespeare, {SHAKESPEARE}) is absent and this case is only "
                    "meaningful on it; put ../shared/data/tinyshakespeare.txt beside the checkout to run it")
    return SHAKESPEARE
