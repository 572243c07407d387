r"""Train-step and inference throughput, compile time and memory; optional PyTorch comparison.

    python scripts/benchmark.py --models pyconvresnet50,resnet50 --batch_size 16 --image_size 224 \
        [--dtype bfloat16] [--lowerings auto,grouped] [--remat] [--compare_torch] [--levels]
        [--peak_tflops 989.4] [--alternate_rounds 14]
        [--memory_batch_sizes 64,256] [--input_pipeline] [--blocks] [--output benchmark.json]
"""

import dataclasses
import json
import os
import sys
import tempfile

# The PyTorch reference models live in tests/ (they are the tests' independent reference).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pyconv_jax.host import reexec_with_host_settings  # noqa: E402

reexec_with_host_settings()  # before the heavy imports: it restarts the interpreter on Linux

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from pyconv_jax import benchmark  # noqa: E402

flags.DEFINE_list("models", ["pyconvresnet50", "resnet50"], "Registered model names.")
flags.DEFINE_integer("batch_size", 16, "Batch size.")
flags.DEFINE_integer("image_size", 224, "Square input resolution.")
flags.DEFINE_enum("dtype", "float32", list(benchmark.DTYPES),
                  "Compute dtype (PyTorch's bfloat16 is autocast, AMP).")
flags.DEFINE_list("lowerings", ["auto"],
                  "Conv lowerings to measure (auto, grouped, dense, split, onednn).")
flags.DEFINE_bool("remat", False, "Also measure with block rematerialisation.")
flags.DEFINE_bool("compare_torch", False, "Also run the PyTorch reference model, same machine.")
flags.DEFINE_bool("levels", False,
                  "Also time single grouped levels (5x5/4, 7x7/8, 9x9/16, 9x9/32) in each lowering.")
flags.DEFINE_bool("blocks", False, "Also time each distinct residual block alone (train: forward "
                  "and backward; inference) and each stage's pyramid levels alone, beside "
                  "PyTorch's with --compare_torch.")
flags.DEFINE_list("memory_batch_sizes", [], "Also report the train step's planned memory at these "
                  "batch sizes, with and without --remat (compiled, not run).")
flags.DEFINE_bool("timing", True, "Time the train and inference steps (--notiming: only the rest).")
flags.DEFINE_bool("input_pipeline", False, "Also measure the JPEG input pipeline (images/s/core).")
flags.DEFINE_integer("repeats", 5,
                     "Timed calls per measurement (their median, after 2 warm-up calls).")
flags.DEFINE_float("peak_tflops", None, "The device's peak TFLOP/s in --dtype, for the MFU "
                   "column (default: pyconv_jax.benchmark.PEAK_TFLOPS, which lists GPUs).")
flags.DEFINE_integer("alternate_rounds", 0, "Also time the models' train steps in alternation, "
                     "this many rounds (one step of each per round; medians): steadier ratios.")
flags.DEFINE_string("output", None, "Write the results as JSON here.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    print(f"backend: {jax.default_backend()} ({jax.device_count()} x {jax.devices()[0].device_kind})")
    results = []
    if FLAGS.timing:
        print(benchmark.HEADER, flush=True)

    def add(rows):
        for r in rows:
            print(r.row(), flush=True)
        results.extend(rows)

    for name in FLAGS.models if FLAGS.timing else []:
        for lowering in FLAGS.lowerings:
            for remat in ([False, True] if FLAGS.remat else [False]):
                add(benchmark.benchmark_jax(
                    name, batch_size=FLAGS.batch_size, image_size=FLAGS.image_size,
                    dtype=FLAGS.dtype, lowering=lowering, remat=remat, repeats=FLAGS.repeats,
                    peak=FLAGS.peak_tflops))
        if FLAGS.compare_torch:
            add(benchmark.benchmark_torch(
                name, batch_size=FLAGS.batch_size, image_size=FLAGS.image_size,
                dtype=FLAGS.dtype, repeats=FLAGS.repeats, peak=FLAGS.peak_tflops))
    if FLAGS.compare_torch:
        for r in results:
            ref = [t for t in results if t.framework == "torch" and t.model == r.model
                   and t.mode == r.mode]
            if r.framework == "jax" and ref:
                print(f"{r.model} {r.mode} {r.lowering}: JAX time / PyTorch time = "
                      f"{r.seconds_per_step / ref[0].seconds_per_step:.2f}")
    base = {(r.mode, r.lowering): r for r in results if r.framework == "jax" and r.model == "resnet50"}
    for r in results:
        b = base.get((r.mode, r.lowering))
        if r.framework == "jax" and b and r.model != "resnet50":
            print(f"{r.model} {r.mode} {r.lowering}: time / resnet50 time = "
                  f"{r.seconds_per_step / b.seconds_per_step:.2f}")
    alternated = {}
    if FLAGS.alternate_rounds:
        alternated = benchmark.alternated_train_seconds(
            FLAGS.models, batch_size=FLAGS.batch_size, image_size=FLAGS.image_size,
            dtype=FLAGS.dtype, lowering=FLAGS.lowerings[0], rounds=FLAGS.alternate_rounds)
        print(f"train steps in alternation, medians of {FLAGS.alternate_rounds}: " + ", ".join(
            f"{name} {sec * 1e3:.0f} ms" for name, sec in alternated.items()))
        for name, sec in alternated.items():
            if name != "resnet50" and "resnet50" in alternated:
                print(f"{name} train, alternated: time / resnet50 time = "
                      f"{sec / alternated['resnet50']:.3f}")
    levels = {}
    if FLAGS.levels:
        names = benchmark.level_lowerings()
        print("| level | " + " | ".join(f"{n} fwd ms" for n in names) + " | "
              + " | ".join(f"{n} fwd+bwd ms" for n in names) + " |\n|---|"
              + "---:|" * (2 * len(names)))
        for k, g in ((5, 4), (7, 8), (9, 16), (9, 32)):
            t = benchmark.benchmark_level(k, g, repeats=FLAGS.repeats)
            levels[f"{k}x{k}/{g}"] = t
            print(f"| {k}x{k}, {g} groups | "
                  + " | ".join(f"{t[n][0] * 1e3:.1f}" for n in names) + " | "
                  + " | ".join(f"{t[n][1] * 1e3:.1f}" for n in names) + " |", flush=True)
    blocks, stage_levels = [], []
    if FLAGS.blocks:
        settings = dict(batch_size=FLAGS.batch_size, image_size=FLAGS.image_size,
                        lowering=FLAGS.lowerings[0], compare_torch=FLAGS.compare_torch,
                        repeats=FLAGS.repeats)
        for name in FLAGS.models:
            rows = benchmark.benchmark_blocks(name, **settings)
            print(f"{name}, each block alone, batch {FLAGS.batch_size}, {FLAGS.image_size}px:")
            print(benchmark.blocks_table(rows), flush=True)
            blocks += rows
            rows = benchmark.benchmark_stage_levels(name, **settings)
            print(f"{name}, each pyramid level of a stage's stride-1 conv alone:")
            print(benchmark.levels_table(rows), flush=True)
            stage_levels += rows
    memory = {}
    if FLAGS.memory_batch_sizes:
        print("| model | batch | size | memory MiB | with remat MiB |\n|---|---:|---:|---:|---:|")
        for name in FLAGS.models:
            for batch in map(int, FLAGS.memory_batch_sizes):
                plain, remat = (benchmark.train_step_memory(
                    name, batch_size=batch, image_size=FLAGS.image_size, dtype=FLAGS.dtype,
                    remat=r) for r in (False, True))
                memory[f"{name}/{batch}"] = {"plain": plain, "remat": remat}
                print(f"| {name} | {batch} | {FLAGS.image_size} | {benchmark.mebibytes(plain)} | "
                      f"{benchmark.mebibytes(remat)} |", flush=True)
    pipeline = {}
    if FLAGS.input_pipeline:
        with tempfile.TemporaryDirectory() as root:
            benchmark.write_jpeg_folder(root, 512)
            pipeline = benchmark.benchmark_input_pipeline(root, image_size=FLAGS.image_size)
        print(f"input pipeline (500x375 JPEGs, {pipeline['augment']}, {FLAGS.image_size}px): "
              f"{pipeline['images_per_second']:.0f} images/s on {pipeline['cores']} cores = "
              f"{pipeline['per_core']:.0f} images/s per core")
    if FLAGS.output:
        with open(FLAGS.output, "w") as f:
            json.dump({"backend": jax.default_backend(),
                       "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
                       "ld_preload": os.environ.get("LD_PRELOAD"),
                       "results": [dataclasses.asdict(r) for r in results], "levels": levels,
                       "alternated_train_seconds": alternated,
                       "blocks": [dataclasses.asdict(r) for r in blocks],
                       "stage_levels": [dataclasses.asdict(r) for r in stage_levels],
                       "memory": memory, "input_pipeline": pipeline}, f, indent=1)


if __name__ == "__main__":
    app.run(main)
