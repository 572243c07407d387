r"""Trains the small convnet with every conv design on one budget; plots and tabulates the result.

    python scripts/kernel_study.py --output_dir runs/kernel_study            # digits, all designs
    python scripts/kernel_study.py --dataset cifar10 --image_size 32 --steps 2000 \
        --designs plain,stacked,pyconv,grouped:groups=4 --output_dir runs/cifar_study

Writes kernel_study.png (validation accuracy against step, mean over seeds with the min-max
spread shaded), kernel_study.md (design, params, MACs, final accuracy mean ± std, ms per step)
and kernel_study.json (everything, with every seed's curve). The logic is in pyconv_jax.study.
"""

import shlex
import sys

from absl import app, flags

from pyconv_jax import study
from pyconv_jax.layers.designs import CONV_DESIGNS

flags.DEFINE_string(
    "dataset", "digits", "'digits' (embedded) or a prepared tfds dataset, e.g. cifar10."
)
flags.DEFINE_string("data_dir", None, "tfds data directory (default: tfds's).")
flags.DEFINE_string("train_split", "train", "Training split (or tfds slice).")
flags.DEFINE_string("eval_split", None, "Validation split (default: validation, else test).")
flags.DEFINE_integer("steps", 150, "Training steps per variant and seed.")
flags.DEFINE_integer("eval_every", 10, "Evaluate every this many steps.")
flags.DEFINE_integer("seeds", 3, "Number of seeds (0 .. seeds-1): init, dropout and data order.")
flags.DEFINE_integer("image_size", 16, "Square input resolution.")
flags.DEFINE_integer("batch_size", 64, "Training batch size.")
flags.DEFINE_integer("kernel_size", 5, "Window K of every conv block (stacked: (K-1)/2 3x3 convs).")
flags.DEFINE_list("widths", ["32", "64"], "Output channels of the two conv blocks.")
flags.DEFINE_integer("hidden", 128, "Width of the hidden dense layer.")
flags.DEFINE_float("dropout_rate", 0.25, "Dropout after the hidden dense layer.")
flags.DEFINE_float("learning_rate", 3e-3, "Adam peak learning rate (cosine-decayed to 0).")
flags.DEFINE_string("augment", "none", "Training augmentation: none, resize_flip, inception_crop.")
flags.DEFINE_list(
    "designs", list(CONV_DESIGNS),
    "Variants, each design[:field=value]...: " + ", ".join(CONV_DESIGNS)
    + " (e.g. grouped:groups=4).",
)
flags.DEFINE_string("output_dir", "runs/kernel_study", "Where the PNG, MD and JSON go.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    try:
        variants = [study.Variant.parse(spec) for spec in FLAGS.designs]
        config = study.StudyConfig(
            dataset=FLAGS.dataset, data_dir=FLAGS.data_dir, train_split=FLAGS.train_split,
            eval_split=FLAGS.eval_split, image_size=FLAGS.image_size,
            batch_size=FLAGS.batch_size, steps=FLAGS.steps, eval_every=FLAGS.eval_every,
            seeds=tuple(range(FLAGS.seeds)), kernel_size=FLAGS.kernel_size,
            widths=tuple(int(w) for w in FLAGS.widths), hidden=FLAGS.hidden,
            dropout_rate=FLAGS.dropout_rate, learning_rate=FLAGS.learning_rate,
            augment=FLAGS.augment,
        )
        result = study.run_study(variants, config, log=lambda line: print(line, flush=True))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    paths = study.write_outputs(result, FLAGS.output_dir, command=command)
    print()
    print(study.markdown_table(result))
    print()
    for path in paths.values():
        print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
