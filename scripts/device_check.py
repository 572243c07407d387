r"""Checks the conv lowerings and whole models numerically on the default JAX device (a GPU
where one is lent) against PyTorch in float64, in float32 and bfloat16 (pyconv_jax.device_check).

    python scripts/device_check.py [--models pyconvresnet50,pyconvhgresnet50]
        [--lowerings grouped,dense,split] [--whole_models pyconvresnet50]
        [--model_lowerings auto] [--output checks.json]

Prints a summary table, writes every check as JSON, and exits with status 1 if any failed.
"""

import dataclasses
import functools
import json
import os
import sys

# The PyTorch reference models live in tests/ (they are the tests' independent reference).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from pyconv_jax import device_check  # noqa: E402
from pyconv_jax.models import list_models  # noqa: E402

flags.DEFINE_list("models", ["pyconvresnet50", "pyconvhgresnet50"], "Registered model names.")
flags.DEFINE_list("lowerings", ["grouped", "dense", "split"],
                  "Lowerings of the pyramid checks (each stage's pyramid, stride 1 and 2).")
flags.DEFINE_list("whole_models", None, "Models of the whole-model checks (default: --models).")
flags.DEFINE_list("model_lowerings", ["auto"], "Lowerings of the whole-model checks.")
flags.DEFINE_integer("image_size", 64, "Resolution of the whole-model checks.")
flags.DEFINE_integer("batch_size", 8, "Batch of the whole-model checks.")
flags.DEFINE_string("output", None, "Write every check as JSON here.")
FLAGS = flags.FLAGS


def _write(path: str, report: dict) -> None:
    """Writes ``report`` as JSON to ``path`` whole or not at all (a temporary file, renamed)."""
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=1)
    os.replace(path + ".tmp", path)


def main(argv):
    del argv
    whole = FLAGS.models if FLAGS.whole_models is None else FLAGS.whole_models
    unknown = [name for name in dict.fromkeys(FLAGS.models + whole) if name not in list_models()]
    if unknown:
        sys.exit(f"unknown model {', '.join(unknown)}: choose from {', '.join(list_models())}")
    device = jax.devices()[0].device_kind
    print(f"backend: {jax.default_backend()} ({jax.device_count()} x {device})", flush=True)
    # Most telling first (each model's pyramids, then the model), each group's table printed and
    # the JSON rewritten as it ends, so a run cut short keeps what it finished.
    def pyramids(name):
        return f"{name} pyramids", functools.partial(
            device_check.check_pyramids, device_check.pyramid_cases(name), FLAGS.lowerings)

    def model(name):
        return name, functools.partial(device_check.check_model, name, FLAGS.model_lowerings,
                                       batch_size=FLAGS.batch_size, image_size=FLAGS.image_size)

    tasks = []
    for name in FLAGS.models:
        tasks += [pyramids(name)] + ([model(name)] if name in whole else [])
    tasks += [model(name) for name in whole if name not in FLAGS.models]
    checks = []
    for label, run in tasks:
        done = run()
        checks += done
        print(f"{label}: {sum(c.ok for c in done)}/{len(done)} checks passed", flush=True)
        print(device_check.summary(done), flush=True)
        if FLAGS.output:
            _write(FLAGS.output, {"backend": jax.default_backend(), "device": device,
                                  "checks": [dataclasses.asdict(c) | {"ok": c.ok} for c in checks]})
    failed = [c for c in checks if not c.ok]
    if failed:
        sys.exit(f"{len(failed)} of {len(checks)} checks failed: "
                 + "; ".join(f"{c.subject} {c.lowering} {c.dtype}/{c.precision} {c.quantity} "
                             f"{c.error:.2e} > {c.tolerance:.1e}" for c in failed[:5]))


if __name__ == "__main__":
    app.run(main)
