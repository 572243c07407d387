r"""Fine-tuning from a converted PyTorch checkpoint vs training from scratch, on digits.

    PYTHONPATH=. python scripts/finetune_study.py --output_dir runs/finetune_study

Trains the PyTorch reference PyConvResNet-18 on digits classes 0-4 (--source_steps), saves it as
a DataParallel training checkpoint, converts it with pyconv_jax.convert, then trains
configs/digits.py on all 10 classes for --steps steps per seed: from scratch, from a converted
untrained PyTorch model (control; --nocontrol drops it) and from the converted source model.
Writes finetune_study.md (table) and finetune_study.json (every run) into --output_dir. Needs
PyTorch and tests/torch_reference.py (run from the repository root). The logic is in
pyconv_jax.finetune_study.
"""

import logging
import shlex
import sys

from absl import app, flags
from absl import logging as absl_logging

from pyconv_jax import finetune_study

flags.DEFINE_string("output_dir", "runs/finetune_study", "Where the MD and JSON go.")
flags.DEFINE_integer("steps", 40, "Target training steps per run (all 10 classes).")
flags.DEFINE_integer("seeds", 3, "Number of target seeds (0 .. seeds-1).")
flags.DEFINE_integer("source_steps", 300, "PyTorch source training steps (classes 0-4).")
flags.DEFINE_integer("source_seed", 0, "Seed of the source model's init and data order.")
flags.DEFINE_bool("control", True, "Also fine-tune from a converted untrained PyTorch model.")
flags.DEFINE_string("arch", "pyconvresnet18", "Registered architecture (source and target).")
flags.DEFINE_string("workdir", None, "New directory to keep the .pth files, converted and "
                    "trained checkpoints in (default: a temporary one, deleted at the end).")
flags.DEFINE_string("data_dir", None, "tfds data directory (default: tfds's).")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
        sys.exit(2)
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax is chatty at INFO
    logging.getLogger("pyconv_jax").setLevel(logging.INFO)  # "initialised from ..., re-initialised"
    try:
        config = finetune_study.FinetuneStudyConfig(
            arch=FLAGS.arch, data_dir=FLAGS.data_dir, steps=FLAGS.steps,
            seeds=tuple(range(FLAGS.seeds)), source_steps=FLAGS.source_steps,
            source_seed=FLAGS.source_seed, control=FLAGS.control)
        result = finetune_study.run_study(config, workdir=FLAGS.workdir,
                                          log=lambda line: print(line, flush=True))
    except (ValueError, FileExistsError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    command = "PYTHONPATH=. python " + " ".join(shlex.quote(a) for a in sys.argv)
    paths = finetune_study.write_outputs(result, FLAGS.output_dir, command=command)
    print()
    print(finetune_study.markdown_table(result))
    print()
    for path in paths.values():
        print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
