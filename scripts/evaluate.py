r"""Evaluates a checkpoint (training workdir or converted weights): loss, top-1, top-5.

    python scripts/evaluate.py --checkpoint DIR [--dataset imagenet2012 --split validation \
        --resize 256 --crop 224]        # the 320 test-crop setting: --resize 366 --crop 320
"""

import sys

from pyconv_jax.host import reexec_with_host_settings

reexec_with_host_settings()  # before the heavy imports: it restarts the interpreter on Linux

from absl import app, flags  # noqa: E402

from pyconv_jax.evaluation import evaluate_checkpoint  # noqa: E402

flags.DEFINE_string("checkpoint", None, "Checkpoint directory or training workdir.", required=True)
flags.DEFINE_string("dataset", "imagenet2012", "tfds name, 'digits' or 'imagefolder:/path'.")
flags.DEFINE_string("split", "validation", "Split to evaluate, every example once.")
flags.DEFINE_string("data_dir", None, "tfds data_dir.")
flags.DEFINE_integer("resize", 256, "Shorter side after resizing (bilinear, antialiased).")
flags.DEFINE_integer("crop", 224, "Center crop size.")
flags.DEFINE_integer("batch_size", 250, "Global evaluation batch size.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    try:
        m = evaluate_checkpoint(
            FLAGS.checkpoint, dataset=FLAGS.dataset, split=FLAGS.split, data_dir=FLAGS.data_dir,
            resize=FLAGS.resize, crop=FLAGS.crop, batch_size=FLAGS.batch_size)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"{FLAGS.dataset}/{FLAGS.split} ({int(m['eval_examples'])} images, resize {FLAGS.resize}, "
          f"crop {FLAGS.crop}): top-1 {100 * m['eval_top1']:.2f}%  top-5 {100 * m['eval_top5']:.2f}%"
          f"  loss {m['eval_loss']:.4f}")


if __name__ == "__main__":
    app.run(main)
