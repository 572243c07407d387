r"""Prints the top-5 classes and probabilities of each image.

    python scripts/predict.py --checkpoint DIR image.jpg [more.jpg ...]
"""

import sys

from absl import app, flags

from pyconv_jax.evaluation import predict_files

flags.DEFINE_string("checkpoint", None, "Checkpoint directory or training workdir.", required=True)
flags.DEFINE_integer("resize", 256, "Shorter side after resizing.")
flags.DEFINE_integer("crop", 224, "Center crop size.")
FLAGS = flags.FLAGS


def main(argv):
    files = argv[1:]
    if not files:
        print("error: give one or more image files after the flags.", file=sys.stderr)
        sys.exit(2)
    try:
        results = predict_files(FLAGS.checkpoint, files, resize=FLAGS.resize, crop=FLAGS.crop)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    for f, top in zip(files, results):
        print(f)
        for name, p in top:
            print(f"  {100 * p:6.2f}%  {name}")


if __name__ == "__main__":
    app.run(main)
