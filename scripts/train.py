r"""Trains a model from an ml_collections config.

    python scripts/train.py --config configs/pyconv50_imagenet.py --workdir runs/x \
        [--config.batch_size=512 ...]

Multi-host (TPU pods, GPU clusters): run the same command on every host with --multihost (or
with --coordinator_address/--num_processes/--process_id where auto-detection does not apply).
"""

import logging
import sys

from pyconv_jax.host import reexec_with_host_settings

reexec_with_host_settings()  # before the heavy imports: it restarts the interpreter on Linux

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from pyconv_jax.train import train_and_evaluate  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints and metrics go (resumes if present).")
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() (auto-detected cluster).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for manual multi-process.")
flags.DEFINE_integer("num_processes", None, "Number of processes, for manual multi-process.")
flags.DEFINE_integer("process_id", None, "This process's index, for manual multi-process.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax is chatty at INFO
    logging.getLogger("pyconv_jax").setLevel(logging.INFO)
    if FLAGS.coordinator_address:
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    elif FLAGS.multihost:
        jax.distributed.initialize()
    try:
        train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (ValueError, FileNotFoundError, PermissionError, FloatingPointError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
