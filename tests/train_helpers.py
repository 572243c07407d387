"""Helpers shared by the training and fault tests: the tiny config, subprocess runs, parameters."""

import contextlib
import importlib.util
import logging
import os
import socket
import subprocess
import sys
import tempfile

import jax
import numpy as np

from pyconv_jax import checkpoint as ckpt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "tests", "tiny_config.py")
TRAIN_SCRIPT = os.path.join(ROOT, "scripts", "train.py")
FAULT_RUNNER = os.path.join(ROOT, "tests", "fault_runner.py")

#: JAX's persistent compilation cache, shared by the test process and its subprocesses: a
#: training subprocess then loads the programs the tests already compiled (~40 s -> ~14 s a run).
XLA_CACHE_ENV = {
    "JAX_COMPILATION_CACHE_DIR": os.path.join(tempfile.gettempdir(), "pyconv-jax-tests-xla-cache"),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
}


def load_config(path=TINY):
    spec = importlib.util.spec_from_file_location("cfg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def params_at(workdir, step=None):
    """Every variable of ``workdir``'s checkpoint at ``step`` (default: the latest), as numpy."""
    _, variables = ckpt.restore_model_variables(os.path.join(workdir, "checkpoints"), step=step)
    return jax.tree_util.tree_map(np.asarray, variables)


def final_params(workdir):
    return params_at(workdir)


def assert_trees_equal(expected, got):
    """Bitwise equality of two trees of arrays, with the same structure."""
    assert jax.tree_util.tree_structure(expected) == jax.tree_util.tree_structure(got)
    for a, b in zip(jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(got)):
        np.testing.assert_array_equal(a, b)


def run_script(workdir, *extra, devices=1, env_extra=None, fault=None):
    """Starts ``scripts/train.py`` on the tiny config; ``fault`` injects a crash (fault_runner.py).

    Compiled programs are cached on disk (:data:`XLA_CACHE_ENV`), so only the first run of each
    program pays for its compilation.
    """
    env = dict(os.environ, PYTHONPATH=ROOT, **XLA_CACHE_ENV,
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               **(env_extra or {}))
    if fault:
        env["PYCONV_FAULT"] = fault
    return subprocess.Popen(
        [sys.executable, FAULT_RUNNER if fault else TRAIN_SCRIPT, "--config", TINY,
         "--workdir", workdir, *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def compile_log():
    """Collects JAX's compile messages (``jax.log_compiles``) into the yielded list."""
    records = []

    class Grab(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Grab()
    logging.getLogger("jax").addHandler(handler)
    try:
        with jax.log_compiles(True):
            yield records
    finally:
        logging.getLogger("jax").removeHandler(handler)
