r"""Converts a published PyTorch checkpoint (.pth) into a pyconv-jax checkpoint directory.

    python scripts/convert_checkpoint.py --arch pyconvresnet50 \
        --torch_checkpoint pyconvresnet50.pth --output ~/.cache/pyconv_jax/pyconvresnet50

The conversion is strict (every tensor used, every variable filled) and nothing is written
unless it succeeds. Load the result with ``pyconv_jax.load_pretrained(arch, output)``.
"""

import sys

from absl import app, flags, logging

from pyconv_jax.convert import convert_torch_checkpoint

flags.DEFINE_string("arch", None, "Registered model name, e.g. pyconvresnet50.", required=True)
flags.DEFINE_string("torch_checkpoint", None, "PyTorch .pth file (state_dict or "
                    "{'state_dict': ...} training checkpoint).", required=True)
flags.DEFINE_string("output", None, "New (or empty) checkpoint directory to write.",
                    required=True)
flags.DEFINE_integer("num_classes", None, "Classifier outputs; default: rows of fc.weight.")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
        sys.exit(2)
    if not FLAGS["verbosity"].present:  # keep orbax/jax INFO logs out of the one-line output
        logging.set_verbosity(logging.WARNING)
    try:
        summary = convert_torch_checkpoint(
            FLAGS.arch, FLAGS.torch_checkpoint, FLAGS.output, num_classes=FLAGS.num_classes)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"converted {summary['arch']} ({summary['params']:,} params, "
          f"{summary['num_classes']} classes) from {summary['source']} -> {summary['output']}")


if __name__ == "__main__":
    app.run(main)
