"""``scripts/train.py`` with one injected crash, for the fault tests: a real SIGKILL, chosen point.

``PYCONV_FAULT="<point>:<step>"``, where ``point`` is one of

- ``after_metrics``: after the metrics of ``step`` are written (between two checkpoints);
- ``before_commit``: inside the save of ``step``, every file written, before orbax's commit rename;
- ``writing_meta``: inside the save of ``step``, while orbax writes the ``meta`` item;
- ``after_async_save``: right after an asynchronous save of ``step`` is started, the write in flight.

The patches live here, not in the library: the training code has no test hooks.
"""

import functools
import os
import runpy
import signal

import orbax.checkpoint as ocp
from orbax.checkpoint._src.path import atomicity

from pyconv_jax.train import loop, metrics

POINT, STEP = os.environ["PYCONV_FAULT"].split(":")
STEP = int(STEP)


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def after_metrics(write):
    @functools.wraps(write)
    def wrapper(self, step, scalars):
        write(self, step, scalars)
        if step == STEP:
            die()
    return wrapper


def before_commit(finalize):
    @functools.wraps(finalize)
    async def wrapper(self, *args, **kwargs):
        if self._final_path.name == str(STEP):
            die()
        return await finalize(self, *args, **kwargs)
    return wrapper


def writing_meta(save):
    @functools.wraps(save)
    def wrapper(self, directory, *args, **kwargs):
        if f"{os.sep}{STEP}." in str(directory):
            die()
        return save(self, directory, *args, **kwargs)
    return wrapper


def after_async_save(save):
    @functools.wraps(save)
    def wrapper(manager, state, meta):
        save(manager, state, meta)
        if int(state.step) == STEP:
            die()
    return wrapper


if POINT == "after_metrics":
    metrics.MetricsWriter.write = after_metrics(metrics.MetricsWriter.write)
elif POINT == "before_commit":
    atomicity.AtomicRenameTemporaryPath.finalize = before_commit(
        atomicity.AtomicRenameTemporaryPath.finalize)
elif POINT == "writing_meta":
    for name in ("save", "async_save"):
        setattr(ocp.JsonCheckpointHandler, name, writing_meta(getattr(ocp.JsonCheckpointHandler, name)))
elif POINT == "after_async_save":
    loop.save_checkpoint = after_async_save(loop.save_checkpoint)
else:
    raise SystemExit(f"unknown fault point {POINT!r}")

runpy.run_path(os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts", "train.py"),
               run_name="__main__")
