"""Fine-tuning from a converted PyTorch checkpoint against training from scratch, on digits.

The published PyConv weights are ImageNet checkpoints of 25-60M parameters, far beyond a 2-core
CPU; this study shows the same path (PyTorch training checkpoint -> :mod:`pyconv_jax.convert`
-> ``config.init_from``) end to end at a size that runs in minutes, and measures whether the
converted weights help:

1. **Source** (PyTorch): the independent reference model of ``arch``
   (``tests/torch_reference.py``, the published ``state_dict`` layout) trains on another task,
   the digits *training* images of classes 0-4 only, with a 5-class head, SGD. Its images come
   through this project's input pipeline, so the preprocessing is exactly the target's.
2. The model is saved as a ``DataParallel`` training checkpoint would be,
   ``{"state_dict": {"module." + key: tensor}, ...}``, and converted with
   :func:`~pyconv_jax.convert.convert_torch_checkpoint` (5 classes). The converted model is
   checked against PyTorch on the source test images (same logits, same accuracy).
3. **Target**: all 10 classes with the demo recipe ``configs/digits.py`` cut to a small step
   budget, through :func:`~pyconv_jax.train.train_and_evaluate`, once per seed and arm:
   ``scratch`` (the recipe's own init) and ``fine-tuned`` (``config.init_from`` = the converted
   checkpoint; the classifier is re-initialised for 10 classes). Optionally a ``control`` arm
   starts from a converted *untrained* PyTorch model of the same layout, which separates the
   effect of the pretraining from that of PyTorch's initialisation and BatchNorm statistics.
   Everything else (seed, data order, schedule, learning rate, steps) is the same in every arm.

Test top-1 is reported on all 360 test images and separately on the classes the source task
saw (0-4) and those it did not (5-9).

    from pyconv_jax import finetune_study
    result = finetune_study.run_study(finetune_study.FinetuneStudyConfig(steps=40))
    print(finetune_study.markdown_table(result))

Needs PyTorch and ``tests/torch_reference.py`` (run from the repository root with
``PYTHONPATH=.``), like the converter's tests.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from pyconv_jax import reports

OUTPUT_NAME = "finetune_study"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS_CONFIG = os.path.join(REPO_ROOT, "configs", "digits.py")

#: The arms of the target experiment, in table order.
ARMS = ("scratch", "control", "fine-tuned")
_ARM_TEXT = {
    "scratch": "from scratch (the recipe's init)",
    "control": "from a converted untrained PyTorch model (control)",
    "fine-tuned": "fine-tuned from the converted PyTorch source model",
}


@dataclasses.dataclass
class FinetuneStudyConfig:
    """The source task, the target budget and the seeds."""

    arch: str = "pyconvresnet18"
    data_dir: str | None = None
    image_size: int = 16  # as configs/digits.py
    # Source task (PyTorch).
    source_classes: Sequence[int] = (0, 1, 2, 3, 4)
    source_steps: int = 300
    source_batch_size: int = 64
    source_learning_rate: float = 0.1  # SGD momentum 0.9, cosine-decayed to 0
    source_weight_decay: float = 5e-4
    source_seed: int = 0
    source_zero_init_residual: bool = True  # as configs/digits.py's model (see pretrain_...)
    torch_threads: int = 1
    # Target task: configs/digits.py with these changes.
    target_config: str = DIGITS_CONFIG
    steps: int = 40
    seeds: Sequence[int] = (0, 1, 2)
    control: bool = True
    target_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.source_steps < 1:
            raise ValueError(
                f"steps and source_steps must be >= 1, got {self.steps}, {self.source_steps}.")
        if not self.seeds:
            raise ValueError("seeds is empty; give at least one seed.")
        self.seeds = tuple(int(s) for s in self.seeds)
        self.source_classes = tuple(sorted(int(c) for c in self.source_classes))
        if len(self.source_classes) < 2 or len(set(self.source_classes)) != len(
                self.source_classes):
            raise ValueError(f"source_classes must be >= 2 distinct classes, got "
                             f"{self.source_classes}.")
        self.target_overrides = dict(self.target_overrides)

    def arms(self) -> tuple[str, ...]:
        return tuple(a for a in ARMS if a != "control" or self.control)


# ----------------------------------------------------------------------------- data
def load_split(split: str, image_size: int, data_dir: str | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Every example of a digits split, preprocessed by this project's pipeline, in file order.

    Returns ``(images float32 [N, S, S, 3] NHWC, ImageNet-normalised; labels int64 [N])``. The
    evaluation transform with ``resize_size = image_size`` is exactly the training transform
    with ``augment="none"`` (the digits recipe): upscale 8x8 -> SxS bilinear, grey -> RGB,
    ``(x / 255 - mean) / std``; so the PyTorch source model sees what the JAX target sees.
    """
    from pyconv_jax import data

    it = data.create_eval_iterator("digits", split=split, data_dir=data_dir,
                                   image_size=image_size, resize_size=image_size,
                                   local_batch_size=256)
    images, labels = [], []
    for batch in it:
        keep = batch["mask"]
        images.append(batch["image"][keep])
        labels.append(batch["label"][keep])
    return np.concatenate(images), np.concatenate(labels).astype(np.int64)


def select_classes(images: np.ndarray, labels: np.ndarray, classes: Sequence[int]
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The examples whose label is in ``classes``, relabelled ``0 .. len(classes) - 1``."""
    keep = np.isin(labels, classes)
    relabel = {c: i for i, c in enumerate(classes)}
    return images[keep], np.array([relabel[int(y)] for y in labels[keep]], np.int64)


# ----------------------------------------------------------------------------- source (PyTorch)
def _torch_reference():
    """``tests.torch_reference``: the independent PyTorch models (needs the repository root)."""
    try:
        from tests import torch_reference
    except ImportError as err:
        raise ImportError(
            f"the study needs PyTorch and tests/torch_reference.py ({err}); run it from the "
            "repository root with PYTHONPATH=. and PyTorch installed (pip install "
            "'pyconv-jax[torch]')."
        ) from None
    return torch_reference


def zero_init_residual_(model):
    """Zeroes the last BatchNorm scale of every residual block of a PyTorch model, in place.

    torchvision's ``zero_init_residual=True`` (also an option of the published PyConv training
    code): every block starts as the identity. ``configs/digits.py`` trains the JAX model this
    way, so the source model starts like the target's scratch arm (see :func:`new_torch_model`).
    """
    import torch

    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "downsample"):  # a residual block
                last = module.bn3 if hasattr(module, "bn3") else module.bn2
                last.weight.zero_()
    return model


def new_torch_model(config: FinetuneStudyConfig, num_classes: int):
    """The PyTorch reference model of ``config.arch`` with PyTorch's default init, seeded.

    With ``source_zero_init_residual`` every block's last BatchNorm scale starts at zero, as the
    target recipe's model does. Measured on the default setup (seed 0, 300 source steps): the
    source model reaches 99.45% on its test images either way, but a logistic-regression probe on
    its pooled features classifies all 10 test classes at 94.2% with zero-init and at 77.5%
    without (unseen classes 5-9: 92.7% vs 60.9%). Without it, at the target recipe's learning
    rate of 0.1, the fine-tuned run's training loss rose during warm-up and it ended below
    scratch (62.2% vs 82.2% after 40 steps, seed 0); the untrained control reached 20.0%.
    """
    import torch

    torch.manual_seed(config.source_seed)
    model = _torch_reference().build_torch_model(config.arch, num_classes)
    if config.source_zero_init_residual:
        zero_init_residual_(model)
    return model


def pretrain_torch_source(
    config: FinetuneStudyConfig, images: np.ndarray, labels: np.ndarray,
    log: Callable[[str], None] = print,
):
    """Trains the PyTorch reference ``config.arch`` on ``(images, labels)``; returns the model.

    Plain PyTorch, as an outside user would train it: :func:`new_torch_model` (PyTorch's
    default init), SGD with momentum 0.9, coupled weight decay on every parameter, learning
    rate cosine-decayed from ``source_learning_rate`` to 0 over ``source_steps`` steps, plain
    cross-entropy, batches of ``source_batch_size`` drawn by reshuffling the data every epoch
    (last partial batch dropped), BatchNorm in training mode. Seeded by ``source_seed`` (init
    and order). Runs on ``torch_threads`` threads: on the 2-core machine of the study, two
    threads took 80 ms a step when it was idle (one: 150 ms) but 0.8-1.4 s when other jobs
    shared it; one thread stayed near 165 ms. The model is returned in eval mode.
    """
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(config.torch_threads)
    num_classes = int(labels.max()) + 1
    model = new_torch_model(config, num_classes)
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    y = torch.from_numpy(labels)
    batch = min(config.source_batch_size, len(y))
    steps = config.source_steps
    optimizer = torch.optim.SGD(model.parameters(), lr=config.source_learning_rate,
                                momentum=0.9, weight_decay=config.source_weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / steps)))
    generator = torch.Generator().manual_seed(config.source_seed)
    order = torch.empty(0, dtype=torch.long)
    model.train()
    start = time.perf_counter()
    losses, correct, seen = [], 0, 0
    for step in range(1, steps + 1):
        if len(order) < batch:
            order = torch.randperm(len(y), generator=generator)
        index, order = order[:batch], order[batch:]
        logits = model(x[index])
        loss = F.cross_entropy(logits, y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        correct += int((logits.argmax(1) == y[index]).sum())
        seen += batch
        if step % 50 == 0 or step == steps:
            log(f"source step {step}/{steps}: train loss {np.mean(losses):.4f}, train top-1 "
                f"{100 * correct / seen:.1f}% ({time.perf_counter() - start:.0f}s)")
            losses, correct, seen = [], 0, 0
    return model.eval()


def torch_logits(model, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Eval-mode logits of a PyTorch model on NHWC ``images``."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            chunk = images[i:i + batch_size].transpose(0, 3, 1, 2)
            out.append(model(torch.from_numpy(np.ascontiguousarray(chunk))).numpy())
    return np.concatenate(out)


def untrained_torch_model(config: FinetuneStudyConfig, num_classes: int):
    """The source model before training (same init, same seed), in eval mode: the control arm.

    Its BatchNorm statistics are PyTorch's defaults (mean 0, var 1).
    """
    return new_torch_model(config, num_classes).eval()


def save_training_checkpoint(model, path: str, **extra: Any) -> None:
    """Saves ``model`` as a ``DataParallel`` run would: ``{"state_dict": {"module.k": v}, ...}``.

    ``extra`` (e.g. ``step``, ``arch``) is stored beside the state_dict, as in the published
    training scripts' checkpoints; the converter must read past both wrappers.
    """
    import torch

    state_dict = {"module." + k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save({"state_dict": state_dict, **extra}, path)


# ----------------------------------------------------------------------------- JAX side
class Forward:
    """Eval-mode logits of restored checkpoints; one compiled function per model configuration."""

    def __init__(self):
        self._compiled: dict[str, Callable] = {}

    def __call__(self, checkpoint_dir: str, images: np.ndarray) -> np.ndarray:
        import jax

        from pyconv_jax import checkpoint as ckpt

        meta, variables = ckpt.restore_model_variables(checkpoint_dir)
        key = json.dumps([meta["model"], meta.get("model_kwargs", {})], sort_keys=True)
        if key not in self._compiled:
            model = ckpt.build_model(meta)
            self._compiled[key] = jax.jit(lambda v, x: model.apply(v, x, train=False))
        return np.asarray(self._compiled[key](variables, images))


def load_target_config(config: FinetuneStudyConfig, seed: int, init_from: str | None = None):
    """``configs/digits.py`` cut to ``steps`` steps for ``seed``; ``init_from`` for fine-tuning.

    Only the length, the seed, the checkpoint start and the bookkeeping change (one evaluation
    and one checkpoint, at the end); the model, data, optimiser, learning rate and warm-up are
    the recipe's, identical in every arm. ``target_overrides`` apply last.
    """
    spec = importlib.util.spec_from_file_location("finetune_study_target", config.target_config)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    target = module.get_config()
    target.model = config.arch
    target.image_size = config.image_size
    target.eval_resize = config.image_size
    target.data_dir = config.data_dir
    target.num_train_steps = config.steps
    target.seed = seed
    target.eval_every_steps = config.steps
    target.log_every_steps = min(20, config.steps)
    target.checkpoint_every_steps = config.steps
    target.keep_checkpoints = 1
    target.async_checkpoints = False
    if init_from:
        target.init_from = init_from
    for key, value in config.target_overrides.items():
        target[key] = value
    return target


def accuracy_by_group(logits: np.ndarray, labels: np.ndarray, seen: Sequence[int]
                      ) -> dict[str, float]:
    """Top-1 on all examples, on the classes in ``seen`` and on the others."""
    right = logits.argmax(-1) == labels
    in_seen = np.isin(labels, seen)
    return {"top1": float(right.mean()), "top1_seen": float(right[in_seen].mean()),
            "top1_unseen": float(right[~in_seen].mean())}


# ----------------------------------------------------------------------------- the study
def run_study(
    config: FinetuneStudyConfig,
    workdir: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Source training, saving, conversion and every target run; returns a JSON-ready result.

    ``workdir`` (new or empty) keeps the ``.pth`` files, the converted checkpoints and every
    target run; by default a temporary directory is used and deleted at the end. The result:
    ``{"config", "source": {...accuracies, conversion check...}, "runs": [{"arm", "seed",
    "top1", "top1_seen", "top1_unseen", "eval_loss", "wall_s"}], "summary": {arm: {mean/std}},
    "device", "wall_s"}``.
    """
    import jax

    from pyconv_jax.convert import convert_torch_checkpoint

    start = time.perf_counter()
    arms = config.arms()
    temporary = workdir is None
    if temporary:
        workdir = tempfile.mkdtemp(prefix="finetune_study_")
    elif os.path.exists(workdir) and os.listdir(workdir):
        raise FileExistsError(f"workdir {workdir!r} is not empty; a previous run's checkpoints "
                              "would be resumed instead of trained. Choose a new one.")
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    try:
        # --- data, once: the same preprocessed arrays for PyTorch and for the checks.
        train_x, train_y = load_split("train", config.image_size, config.data_dir)
        test_x, test_y = load_split("test", config.image_size, config.data_dir)
        src_train_x, src_train_y = select_classes(train_x, train_y, config.source_classes)
        src_test_x, src_test_y = select_classes(test_x, test_y, config.source_classes)
        num_source = len(config.source_classes)
        log(f"finetune study: {config.arch}, source = digits classes "
            f"{list(config.source_classes)} ({len(src_train_y)} train / {len(src_test_y)} test "
            f"images), target = all 10 classes ({len(train_y)} / {len(test_y)}), "
            f"{config.steps} target steps, seeds {list(config.seeds)}, arms {list(arms)}")

        # --- 1. the source model, in PyTorch.
        t0 = time.perf_counter()
        source_model = pretrain_torch_source(config, src_train_x, src_train_y, log=log)
        source_s = time.perf_counter() - t0
        source_logits = torch_logits(source_model, src_test_x)
        source_top1 = float((source_logits.argmax(-1) == src_test_y).mean())
        log(f"source model: test top-1 on classes {list(config.source_classes)} "
            f"{100 * source_top1:.2f}% ({source_s:.0f}s)")

        # --- 2. save as a DataParallel training checkpoint, convert with the project's converter.
        checkpoints = {}
        starts = {"fine-tuned": source_model}
        if "control" in arms:
            starts["control"] = untrained_torch_model(config, num_source)
        forward = Forward()
        conversion = {}
        for arm, model in starts.items():
            name = "source" if arm == "fine-tuned" else "untrained"
            pth = os.path.join(workdir, f"{config.arch}_{name}.pth")
            save_training_checkpoint(model, pth, arch=config.arch,
                                     step=config.source_steps if arm == "fine-tuned" else 0)
            converted = convert_torch_checkpoint(config.arch, pth, os.path.join(workdir, name),
                                                 num_classes=num_source)
            checkpoints[arm] = converted["output"]
            # The converted model must compute what PyTorch computes.
            jax_logits = forward(converted["output"], src_test_x)
            ref = source_logits if arm == "fine-tuned" else torch_logits(model, src_test_x)
            conversion[name] = {
                "pth_sha256": converted["sha256"], "params": converted["params"],
                "max_abs_logit_diff": float(np.abs(jax_logits - ref).max()),
                "torch_top1": float((ref.argmax(-1) == src_test_y).mean()),
                "jax_top1": float((jax_logits.argmax(-1) == src_test_y).mean()),
            }
            log(f"converted {os.path.basename(pth)} ({converted['params']:,} params): JAX vs "
                f"PyTorch logits max |diff| {conversion[name]['max_abs_logit_diff']:.2e}, "
                f"top-1 {100 * conversion[name]['jax_top1']:.2f}% vs "
                f"{100 * conversion[name]['torch_top1']:.2f}%")
            if conversion[name]["max_abs_logit_diff"] > 1e-3 * max(1.0, float(np.abs(ref).max())):
                raise RuntimeError(f"the converted {name} model disagrees with PyTorch: "
                                   f"{conversion[name]}")

        # --- 3. the target runs.
        from pyconv_jax.train import train_and_evaluate

        runs = []
        for seed in config.seeds:
            for arm in arms:
                target = load_target_config(config, seed, checkpoints.get(arm))
                run_dir = os.path.join(workdir, "runs", f"{arm}_seed{seed}")
                log(f"--- target: {arm}, seed {seed}")
                t = time.perf_counter()
                metrics = train_and_evaluate(target, run_dir)
                wall = time.perf_counter() - t
                logits = forward(os.path.join(run_dir, "checkpoints"), test_x)
                acc = accuracy_by_group(logits, test_y, config.source_classes)
                if abs(acc["top1"] - metrics["eval_top1"]) > 1e-6:
                    raise RuntimeError(f"re-evaluated top-1 {acc['top1']} != the run's "
                                       f"{metrics['eval_top1']} ({run_dir})")
                runs.append({"arm": arm, "seed": seed, **acc,
                             "eval_loss": metrics["eval_loss"], "wall_s": wall})
                log(f"{arm} seed {seed}: test top-1 {100 * acc['top1']:.2f}% (classes seen by "
                    f"the source {100 * acc['top1_seen']:.2f}%, unseen "
                    f"{100 * acc['top1_unseen']:.2f}%), {wall:.0f}s")
    finally:
        if temporary:
            shutil.rmtree(workdir, ignore_errors=True)

    summary = {}
    for arm in arms:
        mine = [r for r in runs if r["arm"] == arm]
        summary[arm] = {}
        for key in ("top1", "top1_seen", "top1_unseen"):
            mean, std = reports.mean_std([r[key] for r in mine])
            summary[arm][key] = {"mean": mean, "std": std, "per_seed": [r[key] for r in mine]}
    return {
        "config": dataclasses.asdict(config) | {"target_config": os.path.relpath(
            config.target_config, REPO_ROOT)},
        "target": {k: v for k, v in load_target_config(config, config.seeds[0]).to_dict().items()
                   if k in ("model", "batch_size", "learning_rate", "lr_batch_size",
                            "weight_decay", "momentum", "schedule", "warmup_epochs",
                            "label_smoothing", "augment", "model_kwargs")},
        "source": {"classes": list(config.source_classes), "train_examples": len(src_train_y),
                   "test_examples": len(src_test_y), "test_top1": source_top1,
                   "wall_s": source_s, "conversion": conversion},
        "test_examples": {"all": len(test_y),
                          "seen": int(np.isin(test_y, config.source_classes).sum())},
        "runs": runs,
        "summary": summary,
        "device": reports.describe_device(),
        "jax_version": jax.__version__,
        "torch_version": __import__("torch").__version__,
        "wall_s": time.perf_counter() - start,
    }


# ----------------------------------------------------------------------------- reporting
def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def markdown_table(result: Mapping[str, Any]) -> str:
    """One line per arm: test top-1 mean ± std and per seed; seen / unseen classes (means)."""
    seeds = result["config"]["seeds"]
    n = len(seeds)
    seen = result["source"]["classes"]
    unseen = [c for c in range(10) if c not in seen]
    lines = [
        f"| start | test top-1 (mean ± std, {n} seed{'s' if n != 1 else ''}) | per seed "
        f"({', '.join(str(s) for s in seeds)}) | classes {seen[0]}-{seen[-1]} (source saw them) | "
        f"classes {unseen[0]}-{unseen[-1]} (unseen) |",
        "|---|---:|---:|---:|---:|",
    ]
    for arm, s in result["summary"].items():
        lines.append(
            f"| {_ARM_TEXT[arm]} | {_pct(s['top1']['mean'])} ± {100 * s['top1']['std']:.1f} | "
            f"{' / '.join(_pct(v) for v in s['top1']['per_seed'])} | "
            f"{_pct(s['top1_seen']['mean'])} | {_pct(s['top1_unseen']['mean'])} |")
    return "\n".join(lines)


def describe(result: Mapping[str, Any]) -> str:
    """One paragraph: source task, conversion, target budget."""
    from pyconv_jax.data import digits

    c, s, t = result["config"], result["source"], result["target"]
    conv = s["conversion"]["source"]
    return (
        f"Source: PyTorch {c['arch']} (tests/torch_reference.py, PyTorch's default init"
        + (", every block's last BatchNorm scale zeroed as in the target recipe"
           if c["source_zero_init_residual"] else "") + ") trained "
        f"{c['source_steps']} steps of batch {c['source_batch_size']} on the digits training "
        f"images of classes {s['classes']} ({s['train_examples']} images, "
        f"{len(s['classes'])}-class head), SGD "
        f"momentum 0.9, lr {c['source_learning_rate']} cosine to 0, weight decay "
        f"{c['source_weight_decay']}: {_pct(s['test_top1'])} on those classes' "
        f"{s['test_examples']} test images. Saved as {{'state_dict': {{'module.' + key: ...}}}}, "
        f"converted with convert_torch_checkpoint ({conv['params']:,} params; JAX vs PyTorch "
        f"logits max |diff| {conv['max_abs_logit_diff']:.1e}). Target: {c['target_config']} "
        f"({t['model']}, batch {t['batch_size']}, SGD lr {t['learning_rate']} per "
        f"{t['lr_batch_size']}, {t['warmup_epochs']:g} epoch warm-up then {t['schedule']}, "
        f"weight decay "
        f"{t['weight_decay']}, label smoothing {t['label_smoothing']}) cut to {c['steps']} steps "
        f"(about {c['steps'] * t['batch_size'] / digits.NUM_TRAIN:.1f} epochs) on all 10 classes; "
        f"test top-1 "
        f"on the {result['test_examples']['all']} test images. Seeds {list(c['seeds'])} set the "
        f"init of everything not loaded (the 10-class head), dropout and the data order; every "
        f"arm of a seed sees the same batches. {result['device']}."
    )


def write_outputs(result: Mapping[str, Any], output_dir: str, name: str = OUTPUT_NAME,
                  command: str | None = None) -> dict[str, str]:
    """Writes ``{name}.md`` (description, table, command) and ``{name}.json`` (everything)."""
    os.makedirs(output_dir, exist_ok=True)
    paths = {ext: os.path.join(output_dir, f"{name}.{ext}") for ext in ("md", "json")}
    lines = ["# Fine-tuning from a converted PyTorch checkpoint vs from scratch (digits)", "",
             describe(result), "", markdown_table(result), ""]
    footer = (f"Wall time: {result['wall_s']:.0f} s (source training "
              f"{result['source']['wall_s']:.0f} s; jax {result['jax_version']}, torch "
              f"{result['torch_version']}).")
    reports.write_report(paths, lines, footer, result, command)
    return paths


__all__ = [
    "ARMS", "FinetuneStudyConfig", "accuracy_by_group", "describe", "load_split",
    "load_target_config", "markdown_table", "pretrain_torch_source", "run_study",
    "save_training_checkpoint", "select_classes", "torch_logits", "untrained_torch_model",
    "write_outputs",
]
