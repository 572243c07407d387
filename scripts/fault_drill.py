r"""Kills a training run at random moments and checks that the restarts end where a clean run does.

    python scripts/fault_drill.py --config configs/digits.py --workdir runs/drill --kills 5 \
        [--min_seconds 20 --max_seconds 60] [-- --config.num_epochs=3 ...]

Exit status 0 if every kill happened and the final variables are bitwise equal to the
uninterrupted run's, else 1.
Arguments after ``--`` are passed to scripts/train.py.
"""

import sys

from absl import app, flags
from absl import logging as absl_logging

from pyconv_jax import fault_drill

flags.DEFINE_string("config", "configs/digits.py", "Training config file.")
flags.DEFINE_string("workdir", None, "Where the reference and killed runs go (must be new).")
flags.DEFINE_integer("kills", 5, "How many SIGKILLs.")
flags.DEFINE_float("min_seconds", 20.0, "Earliest kill after a (re)start.")
flags.DEFINE_float("max_seconds", 60.0, "Latest kill after a (re)start.")
flags.DEFINE_integer("seed", 0, "Seeds the kill times.")
flags.mark_flag_as_required("workdir")
FLAGS = flags.FLAGS


def main(argv):
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax is chatty at INFO
    kills, equal = fault_drill.run_drill(
        FLAGS.config, FLAGS.workdir, argv[1:], kills=FLAGS.kills, min_seconds=FLAGS.min_seconds,
        max_seconds=FLAGS.max_seconds, seed=FLAGS.seed)
    print(fault_drill.report(kills, equal, FLAGS.kills))
    sys.exit(0 if equal and len(kills) == FLAGS.kills else 1)


if __name__ == "__main__":
    app.run(main)
