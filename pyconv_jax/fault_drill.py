"""The long fault drill: kill a training run at random moments, restart it, compare with a clean run.

The tests (``tests/test_faults.py``) kill the tiny config at chosen points; this drill runs any
config for longer, with SIGKILLs at random times (so some land during saves), and checks the
promise of the training loop: a killed-and-restarted run ends with parameters bitwise equal to an
uninterrupted run of the same command.

    python scripts/fault_drill.py --config configs/digits.py --workdir runs/drill --kills 5
"""

from __future__ import annotations

import dataclasses
import glob
import os
import random
import signal
import subprocess
import sys

import jax
import numpy as np

from pyconv_jax import checkpoint as ckpt

TRAIN_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "scripts", "train.py")


@dataclasses.dataclass
class Kill:
    after_seconds: float
    latest_step_after: int | None  # newest complete checkpoint once the process was dead
    during_save: bool  # an unfinished save was on disk at the kill


def _train(config: str, workdir: str, overrides: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, TRAIN_SCRIPT, "--config", config, "--workdir", workdir,
                             *overrides], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _latest_step(workdir: str) -> int | None:
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return None
    return ckpt.open_manager(directory, create=False).latest_step()


def run_drill(config: str, workdir: str, overrides: list[str], *, kills: int, min_seconds: float,
              max_seconds: float, seed: int = 0) -> tuple[list[Kill], bool]:
    """Runs ``config`` once cleanly and once with ``kills`` random SIGKILLs; returns the kills and
    whether both runs ended with bitwise equal variables."""
    rng = random.Random(seed)
    reference, killed = os.path.join(workdir, "reference"), os.path.join(workdir, "killed")
    if _train(config, reference, overrides).wait() != 0:
        raise RuntimeError(f"the uninterrupted run failed; see `python {TRAIN_SCRIPT} ...`")
    log = []
    for _ in range(kills):
        proc = _train(config, killed, overrides)
        delay = rng.uniform(min_seconds, max_seconds)
        try:
            proc.wait(timeout=delay)  # finished before the kill: nothing left to interrupt
            break
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        unfinished = glob.glob(os.path.join(killed, "checkpoints", "*orbax-checkpoint-tmp*"))
        log.append(Kill(delay, _latest_step(killed), bool(unfinished)))
    if _train(config, killed, overrides).wait() != 0:
        raise RuntimeError("the restarted run failed")
    got = [np.asarray(x) for x in jax.tree_util.tree_leaves(
        ckpt.restore_model_variables(os.path.join(killed, "checkpoints"))[1])]
    want = [np.asarray(x) for x in jax.tree_util.tree_leaves(
        ckpt.restore_model_variables(os.path.join(reference, "checkpoints"))[1])]
    equal = len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))
    return log, equal


def report(kills: list[Kill], equal: bool, asked: int) -> str:
    """A markdown table of the kills and the verdict."""
    lines = ["| kill | after s | newest complete checkpoint | during a save |", "|---:|---:|---:|---|"]
    lines += [f"| {i + 1} | {k.after_seconds:.1f} | {k.latest_step_after} | "
              f"{'yes' if k.during_save else 'no'} |" for i, k in enumerate(kills)]
    verdict = "bitwise EQUAL to" if equal else "DIFFERENT from"
    short = (f"\nonly {len(kills)} of {asked} kills happened before the run finished: use a longer "
             "run or shorter --max_seconds" if len(kills) < asked else "")
    return "\n".join(lines) + f"\n\nfinal variables: {verdict} the uninterrupted run{short}"
