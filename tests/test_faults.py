"""Faults: runs killed at any point resume to the same parameters, damaged checkpoints are set
aside, preemption stops every process at one step, and bad input fails in one line.

Kills are real SIGKILLs of ``scripts/train.py`` subprocesses at chosen points
(``tests/fault_runner.py``); damage is done to the files on disk.
"""

import glob
import logging
import os
import shutil
import signal
import time

import pytest

from pyconv_jax import checkpoint as ckpt
from pyconv_jax.train import train_and_evaluate
from tests.train_helpers import (assert_trees_equal, compile_log, final_params, free_port,
                                 load_config, params_at, run_script)


def saved_steps(workdir):
    return ckpt.open_manager(os.path.join(workdir, "checkpoints"), create=False).all_steps()


def finish(proc, expect_rc):
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == expect_rc, out[-3000:]
    return out


def test_runs_killed_at_any_point_end_bitwise_equal_to_an_uninterrupted_run(tiny_run, tmp_path):
    """SIGKILL during a save before its commit, between checkpoints, during an asynchronous save,
    and while the save's metadata is written; each restart resumes from the newest complete
    checkpoint, and the last one ends with exactly the uninterrupted run's parameters."""
    workdir = str(tmp_path / "w")
    # Killed inside the step-4 save, all files written but not committed: only step 2 counts.
    finish(run_script(workdir, fault="before_commit:4"), -signal.SIGKILL)
    assert saved_steps(workdir) == [2]
    assert glob.glob(os.path.join(workdir, "checkpoints", "4.orbax-checkpoint-tmp*"))
    # Killed between checkpoints, after step 3's eval; the unfinished step-4 save is cleaned up.
    out = finish(run_script(workdir, fault="after_metrics:3"), -signal.SIGKILL)
    assert "from step 2" in out
    assert saved_steps(workdir) == [2]
    assert not glob.glob(os.path.join(workdir, "checkpoints", "*tmp*"))
    # Killed right after an asynchronous save of step 4 started: committed or not, both are fine.
    finish(run_script(workdir, "--config.async_checkpoints=True", fault="after_async_save:4"),
           -signal.SIGKILL)
    assert saved_steps(workdir) in ([2], [2, 4])
    # Killed while the step-6 save writes its metadata.
    finish(run_script(workdir, fault="writing_meta:6"), -signal.SIGKILL)
    assert saved_steps(workdir) == [2, 4]
    out = finish(run_script(workdir), 0)
    assert "from step 4" in out
    assert saved_steps(workdir) == [2, 4, 6]
    assert_trees_equal(final_params(tiny_run[0]), final_params(workdir))


def damage(workdir, step, how):
    """Damages the largest array file of checkpoint ``step``: one flipped byte, or cut in half."""
    files = glob.glob(os.path.join(workdir, "checkpoints", str(step), "model", "**", "d", "*"),
                      recursive=True)
    path = max(files, key=os.path.getsize)
    data = bytearray(open(path, "rb").read())
    if how == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    open(path, "wb").write(bytes(data))


def test_damaged_latest_checkpoints_are_set_aside_and_the_run_resumes_from_an_intact_one(
        tiny_run, tmp_path, caplog):
    """A flipped byte (which orbax alone restores silently) and a truncated file are both caught;
    the damaged steps move to ``checkpoints.damaged/`` and the run retrains from step 2 to the
    uninterrupted run's exact parameters."""
    workdir = str(tmp_path / "w")
    shutil.copytree(tiny_run[0], workdir)
    damage(workdir, 6, "flip")
    damage(workdir, 4, "truncate")
    with pytest.raises(ckpt.DamagedCheckpointError, match="do not match the checksum"):
        params_at(workdir, 6)  # evaluate / load_pretrained / init_from refuse it too
    with caplog.at_level(logging.WARNING, logger="pyconv_jax.train"):
        train_and_evaluate(load_config(), workdir)
    warnings = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(warnings) == 2 and "step 6" in warnings[0] and "step 4" in warnings[1], warnings
    assert "DamagedCheckpointError" in warnings[0] and "error while reading" in warnings[1]
    kept = sorted(os.listdir(os.path.join(workdir, "checkpoints.damaged")))
    assert [name.split("-")[0] for name in kept] == ["4", "6"]  # kept for inspection
    assert saved_steps(workdir) == [2, 4, 6]
    assert_trees_equal(final_params(tiny_run[0]), final_params(workdir))


def test_a_checkpoint_of_another_model_is_an_error_not_damage(tiny_run, tmp_path):
    workdir = str(tmp_path / "w")
    shutil.copytree(tiny_run[0], workdir)
    config = load_config()
    config.model_kwargs.stage_widths = (16, 32, 64, 256)
    with pytest.raises(ckpt.CheckpointMismatchError, match="use a new --workdir or the matching"):
        train_and_evaluate(config, workdir)
    assert saved_steps(workdir) == [2, 4, 6]  # nothing moved or deleted
    assert not os.path.exists(os.path.join(workdir, "checkpoints.damaged"))


def test_preempting_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
    """SIGTERM to process 1 only: JAX's preemption service tells process 0, both save the same
    step and exit 0, and a restart of both continues from it."""
    workdir = str(tmp_path / "w")
    port = free_port()

    def start(num_steps):
        return [run_script(workdir, "--coordinator_address", f"localhost:{port}",
                           "--num_processes", "2", "--process_id", str(i),
                           f"--config.num_train_steps={num_steps}",
                           "--config.checkpoint_every_steps=1000", "--config.eval_every_steps=1000",
                           devices=1) for i in range(2)]

    procs = start(2000)
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 400
    while not (os.path.exists(metrics) and open(metrics).read().count("\n") >= 2):
        assert all(p.poll() is None for p in procs) and time.time() < deadline, \
            procs[0].stdout.read()[-3000:]
        time.sleep(0.5)
    procs[1].send_signal(signal.SIGTERM)
    outs = [finish(p, 0) for p in procs]
    (stopped,) = saved_steps(workdir)
    assert 4 <= stopped < 2000
    for out in outs:
        assert f"every process saves at step {stopped}" in out, out[-2000:]
    port = free_port()
    outs = [finish(p, 0) for p in start(stopped + 2)]
    assert f"from step {stopped}" in outs[0]
    assert saved_steps(workdir) == [stopped, stopped + 2]


@pytest.mark.parametrize("change,error,message", [
    ({"dataset": "imagenet2021"}, ValueError, "unknown dataset 'imagenet2021'"),
    ({"model_kwargs.pyconv_groups": ((1, 4), (1, 3), (1,), (1,))}, ValueError,
     "stage 2 pyramid (kernels [3, 5], groups [1, 3], width 32) does not fit: level 2 "
     "(kernel 5x5): 16 output channels are not divisible by 3 groups; use a multiple of 3"),
    ({"workdir_under_a_file": True}, PermissionError, "cannot create workdir"),
    ({"init_from": "/nonexistent/checkpoints"}, FileNotFoundError, "does not exist"),
])
def test_bad_configs_fail_before_compiling_and_write_nothing(tmp_path, change, error, message):
    """The exit status 2 of scripts/train.py for these is tested in test_train.py; here, the
    messages, and that nothing was compiled or written."""
    config = load_config()
    workdir = tmp_path / "w"
    for key, value in change.items():
        if key == "workdir_under_a_file":
            (tmp_path / "file").write_text("")
            workdir = tmp_path / "file" / "w"
        elif key.startswith("model_kwargs."):
            config.model_kwargs[key.split(".")[1]] = value
        else:
            config[key] = value
    with compile_log() as records, pytest.raises(error) as raised:
        train_and_evaluate(config, str(workdir))
    assert message in str(raised.value) and "\n" not in str(raised.value)
    assert not [r for r in records if "train_step" in r and r.startswith("Compiling")]
    assert not glob.glob(os.path.join(str(workdir), "checkpoints", "*"))
