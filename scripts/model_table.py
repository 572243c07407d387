"""Prints a markdown table of every registered model: parameters and MACs at 224x224.

Counts come from `jax.eval_shape` / the traced forward pass (no compile), next to the published
figures. Usage: python scripts/model_table.py [--image_size 224] [--models 'pyconv*']
"""

from absl import app, flags

from pyconv_jax.counting import model_table

flags.DEFINE_integer("image_size", 224, "Square input resolution for the MAC count.")
flags.DEFINE_string("models", None, "Glob over registered model names (default: all).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    print(model_table(FLAGS.models, FLAGS.image_size))


if __name__ == "__main__":
    app.run(main)
