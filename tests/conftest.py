"""Test-wide set-up: JAX on the CPU with 8 fake devices, and no network.

The flags must be set before JAX is imported anywhere, hence at the top of the
root conftest. Tests that need a different device count or several processes
start subprocesses (see tests/multiprocess helpers).
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
# No network at test time: hub names must fail fast, datasets must not phone home.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One persistent compilation cache for the whole session, shared with the subprocesses the tests
# start (they inherit the environment): the suite compiles the same small programs again and
# again (every make_train_step, every resumed or killed run in a child process), and XLA:CPU
# compilation is most of its time. A fresh directory per session, so nothing stale is executed.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="arcstream-test-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
