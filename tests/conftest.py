"""Test-wide settings: float64 JAX, one thread per process (torch, XLA, OpenMP; `make test` runs one pytest
worker per core, and command-line tests' subprocesses inherit the settings), no hub access, and one on-disk
cache of compiled XLA programs for every test process."""

import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

# Compiled XLA programs go to an on-disk cache that every test process shares (the pytest workers and the
# command-line tests' subprocesses): JAX keys an entry by the program, the compiler flags and the versions,
# so a hit is exactly what the process would have compiled. Compilation is about 40 % of the suite's CPU
# time; a rerun on the same checkout skips most of it, a first run (CI's fresh clone) gains little. Every
# program is cached however fast it compiled; the size cap turns on JAX's file lock (two workers write at
# once). The folder sits in pytest's own cache folder (ignored by git; `make clean` removes it).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax-compilation"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(2 * 1024 ** 3))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)


def pytest_configure(config):
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    torch.set_num_threads(1)
