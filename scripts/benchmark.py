r"""Train-step and inference throughput, compile time and memory; optional PyTorch comparison.

    python scripts/benchmark.py --models pyconvresnet50,resnet50 --batch_size 16 --image_size 224 \
        [--dtype bfloat16] [--lowerings auto,grouped] [--remat] [--compare_torch] [--levels]
        [--output benchmark.json]
"""

import dataclasses
import json

import jax
from absl import app, flags

from pyconv_jax import benchmark

flags.DEFINE_list("models", ["pyconvresnet50", "resnet50"], "Registered model names.")
flags.DEFINE_integer("batch_size", 16, "Batch size.")
flags.DEFINE_integer("image_size", 224, "Square input resolution.")
flags.DEFINE_string("dtype", "float32", "Compute dtype (float32, bfloat16).")
flags.DEFINE_list("lowerings", ["auto"], "PyConv lowerings to measure (auto, grouped, dense).")
flags.DEFINE_bool("remat", False, "Also measure with block rematerialisation.")
flags.DEFINE_bool("compare_torch", False, "Also run the PyTorch reference model, same machine.")
flags.DEFINE_bool("levels", False, "Also time single grouped levels (5x5/4, 7x7/8, 9x9/16).")
flags.DEFINE_integer("repeats", 3, "Timed calls per measurement (after 2 warm-up calls).")
flags.DEFINE_string("output", None, "Write the results as JSON here.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    print(f"backend: {jax.default_backend()} ({jax.device_count()} x {jax.devices()[0].device_kind})")
    results = []
    for name in FLAGS.models:
        for lowering in FLAGS.lowerings:
            for remat in ([False, True] if FLAGS.remat else [False]):
                results += benchmark.benchmark_jax(
                    name, batch_size=FLAGS.batch_size, image_size=FLAGS.image_size,
                    dtype=FLAGS.dtype, lowering=lowering, remat=remat, repeats=FLAGS.repeats)
        if FLAGS.compare_torch:
            results += benchmark.benchmark_torch(
                name, batch_size=FLAGS.batch_size, image_size=FLAGS.image_size,
                repeats=FLAGS.repeats)
    print(benchmark.HEADER)
    for r in results:
        print(r.row())
    if FLAGS.compare_torch:
        for r in results:
            ref = [t for t in results if t.framework == "torch" and t.model == r.model
                   and t.mode == r.mode]
            if r.framework == "jax" and ref:
                print(f"{r.model} {r.mode} {r.lowering}: JAX time / PyTorch time = "
                      f"{r.seconds_per_step / ref[0].seconds_per_step:.2f}")
    levels = {}
    if FLAGS.levels:
        print("| level | grouped fwd ms | dense fwd ms | grouped fwd+bwd ms | dense fwd+bwd ms |\n"
              "|---|---:|---:|---:|---:|")
        for k, g in ((5, 4), (7, 8), (9, 16), (9, 32)):
            t = benchmark.benchmark_level(k, g, repeats=FLAGS.repeats)
            levels[f"{k}x{k}/{g}"] = t
            print(f"| {k}x{k}, {g} groups | {t['grouped'][0] * 1e3:.1f} | {t['dense'][0] * 1e3:.1f} "
                  f"| {t['grouped'][1] * 1e3:.1f} | {t['dense'][1] * 1e3:.1f} |")
    if FLAGS.output:
        with open(FLAGS.output, "w") as f:
            json.dump({"backend": jax.default_backend(),
                       "results": [dataclasses.asdict(r) for r in results], "levels": levels},
                      f, indent=1)


if __name__ == "__main__":
    app.run(main)
