"""The kernel-design study: train the small convnet with every conv design on the same budget.

Every variant (a conv design from :data:`~pyconv_jax.layers.designs.CONV_DESIGNS` plus its
fields) trains :class:`~pyconv_jax.models.small_convnet.SmallConvNet` with the same data, seeds,
optimizer (Adam, cosine-decayed learning rate), steps and batch size, and is evaluated on the
held-out split every ``eval_every`` steps. The result holds the validation-accuracy curves of
every seed, parameters and MACs by formula, final accuracy and time per step; :func:`write_outputs`
turns it into ``kernel_study.png`` (curves), ``kernel_study.md`` (table) and ``kernel_study.json``.

    from pyconv_jax import study
    result = study.run_study([study.Variant.parse(d) for d in ("plain", "pyconv")],
                             study.StudyConfig(steps=150, seeds=(0, 1, 2)))
    study.write_outputs(result, "runs/kernel_study")

Fairness and cost: the training batches of a seed are read once through the input pipeline and
reused by every variant (the same examples in the same order), and evaluation batches are read
once for the whole study. Each variant's train and eval steps are compiled once (``jax.jit``,
ahead of time) and reused for every seed; the step's RNG is an argument. Nothing syncs with the
host between evaluation points, so ``ms_per_step`` is the device time of the steps.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pyconv_jax import reports
from pyconv_jax.layers.designs import get_conv_design
from pyconv_jax.models.small_convnet import SmallConvNet
from pyconv_jax.train.steps import TrainState, cross_entropy, eval_step

OUTPUT_NAME = "kernel_study"

#: PRNG of the study's init and dropout keys. XLA:CPU compiles threefry's init of even this tiny
#: model in ~10 s against ~1.5 s for "rbg" (measured on 2 cores); the choice only changes which
#: random numbers are drawn, and every variant and seed uses the same one.
PRNG_IMPL = "rbg"


def prng_key(seed: int) -> jax.Array:
    return jax.random.key(seed, impl=PRNG_IMPL)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One line of the study: a conv design and its design-specific fields."""

    conv: str
    conv_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    label: str = ""

    def __post_init__(self) -> None:
        get_conv_design(self.conv)  # unknown names fail here, listing the known ones
        if not self.label:
            extra = "".join(f":{k}={v}" for k, v in self.conv_kwargs.items())
            object.__setattr__(self, "label", self.conv + extra)

    @classmethod
    def parse(cls, spec: str) -> Variant:
        """``"design[:field=value]..."``, e.g. ``"pyconv"``, ``"grouped:groups=4"``.

        Values are Python literals (``4``, ``True``, ``(3, 5)``); anything else is a string.
        """
        name, *fields = spec.strip().split(":")
        kwargs = {}
        for field in fields:
            key, sep, value = field.partition("=")
            if not sep or not key:
                raise ValueError(
                    f"bad variant {spec!r}: expected design[:field=value]..., e.g. grouped:groups=4"
                )
            try:
                kwargs[key.strip()] = ast.literal_eval(value.strip())
            except (ValueError, SyntaxError):
                kwargs[key.strip()] = value.strip()
        return cls(conv=name.strip(), conv_kwargs=kwargs, label=spec.strip())


@dataclasses.dataclass
class StudyConfig:
    """The budget and model shared by every variant."""

    dataset: str = "digits"
    data_dir: str | None = None
    train_split: str = "train"
    eval_split: str | None = None  # default: the dataset's validation or test split
    image_size: int = 16
    batch_size: int = 64
    eval_batch_size: int = 128
    steps: int = 150
    eval_every: int = 10
    seeds: Sequence[int] = (0, 1, 2)
    kernel_size: int = 5
    widths: Sequence[int] = (32, 64)
    hidden: int = 128
    dropout_rate: float = 0.25
    learning_rate: float = 3e-3
    augment: str = "none"

    def __post_init__(self) -> None:
        if self.steps < 1 or self.eval_every < 1:
            raise ValueError(
                f"steps and eval_every must be >= 1, got {self.steps}, {self.eval_every}."
            )
        if not self.seeds:
            raise ValueError("seeds is empty; give at least one seed.")
        self.seeds = tuple(int(s) for s in self.seeds)
        self.widths = tuple(int(w) for w in self.widths)

    def eval_steps(self) -> list[int]:
        """Steps after which the model is evaluated: 0, eval_every, 2 eval_every, ..., steps."""
        points = list(range(0, self.steps, self.eval_every))
        return points + [self.steps]


def build_model(variant: Variant, config: StudyConfig, num_classes: int) -> SmallConvNet:
    return SmallConvNet(
        num_classes=num_classes,
        conv=variant.conv,
        conv_kwargs=dict(variant.conv_kwargs),
        kernel_size=config.kernel_size,
        widths=tuple(config.widths),
        hidden=config.hidden,
        dropout_rate=config.dropout_rate,
    )


def make_train_step(num_classes: int) -> Callable:
    """``(state, batch, key) -> (state, metrics)``; dropout RNG = ``fold_in(key, state.step)``."""

    def train_step(state: TrainState, batch: dict[str, jax.Array], key: jax.Array):
        rng = jax.random.fold_in(key, state.step)
        targets = jax.nn.one_hot(batch["label"], num_classes)

        def loss_fn(params):
            logits, updates = state.apply_fn(
                {"params": params, "batch_stats": state.batch_stats}, batch["image"], train=True,
                mutable=["batch_stats"], rngs={"dropout": rng},
            )
            return jnp.mean(cross_entropy(logits, targets)), (logits, updates["batch_stats"])

        (loss, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        state = state.apply_gradients(grads=grads, batch_stats=stats)
        top1 = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        return state, {"loss": loss, "top1": top1}

    return train_step


def _load_train_batches(config: StudyConfig, seed: int) -> list[dict[str, jax.Array]]:
    from pyconv_jax import data

    it = data.create_train_iterator(
        config.dataset, split=config.train_split, data_dir=config.data_dir,
        image_size=config.image_size, local_batch_size=config.batch_size, seed=seed,
        augment=config.augment,
    )
    batches = [next(it) for _ in range(config.steps)]
    return [jax.device_put({"image": b["image"], "label": b["label"]}) for b in batches]


def _load_eval_batches(config: StudyConfig, split: str) -> list[dict[str, jax.Array]]:
    from pyconv_jax import data

    it = data.create_eval_iterator(
        config.dataset, split=split, data_dir=config.data_dir, image_size=config.image_size,
        local_batch_size=config.eval_batch_size, resize_size=config.image_size,
    )
    return [jax.device_put(b) for b in it]


def run_study(
    variants: Sequence[Variant],
    config: StudyConfig,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Trains every variant with every seed; returns curves, counts, accuracies and timings.

    The result is JSON-ready: ``{"config", "dataset", "eval_steps", "device", "wall_s",
    "variants": [{"label", "conv", "conv_kwargs", "conv_params", "conv_macs", "params", "macs",
    "accuracy": [[per eval step] per seed], "train_loss": [[loss of the last step before each
    eval point (None at step 0)] per seed], "final_accuracy": [per seed],
    "final_accuracy_mean", "final_accuracy_std", "ms_per_step", "compile_s"}]}``.
    """
    from pyconv_jax import data

    start = time.perf_counter()
    if not variants:
        raise ValueError("no variants to study")
    labels = [v.label for v in variants]
    if len(set(labels)) != len(labels):
        raise ValueError(f"variant labels must be unique, got {labels}")
    info = data.get_dataset_info(config.dataset, config.data_dir)
    eval_split = config.eval_split or info.eval_split
    if eval_split is None:
        raise ValueError(
            f"dataset {config.dataset!r} has no validation or test split; set eval_split"
        )
    num_classes = info.num_classes
    eval_steps = config.eval_steps()
    models = [build_model(v, config, num_classes) for v in variants]  # bad fields fail now
    log(
        f"kernel study: {len(variants)} variants x {len(config.seeds)} seeds x {config.steps} "
        f"steps on {config.dataset} ({config.train_split} -> {eval_split}), image "
        f"{config.image_size}, batch {config.batch_size}, K={config.kernel_size}, widths "
        f"{list(config.widths)}, device {jax.devices()[0].platform}"
    )
    eval_batches = _load_eval_batches(config, eval_split)
    train_batches = {seed: _load_train_batches(config, seed) for seed in config.seeds}
    log(f"data ready in {time.perf_counter() - start:.1f}s")

    schedule = optax.cosine_decay_schedule(config.learning_rate, config.steps)
    tx = optax.adam(schedule)
    dummy = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
    rows = []
    for index, (variant, model) in enumerate(zip(variants, models), start=1):
        counts = model.counts(config.image_size)
        t0 = time.perf_counter()
        init = jax.jit(lambda key, model=model: model.init(key, dummy, train=False))
        first = init(prng_key(config.seeds[0]))
        state = TrainState.create(
            apply_fn=model.apply, params=first["params"], tx=tx, batch_stats=first["batch_stats"]
        )
        key0 = prng_key(config.seeds[0])
        batch0 = train_batches[config.seeds[0]][0]
        train_step = jax.jit(make_train_step(num_classes)).lower(state, batch0, key0).compile()
        evaluate = jax.jit(eval_step).lower(state, eval_batches[0]).compile()
        compile_s = time.perf_counter() - t0

        def accuracy(state) -> float:
            sums = [evaluate(state, b) for b in eval_batches]
            top1 = sum(s["top1"] for s in sums)
            count = sum(s["count"] for s in sums)
            top1, count = jax.device_get((top1, count))
            return float(top1) / float(count)

        curves, losses, window_ms = [], [], []
        for seed in config.seeds:
            variables = init(prng_key(seed))
            state = TrainState.create(
                apply_fn=model.apply, params=variables["params"], tx=tx,
                batch_stats=variables["batch_stats"],
            )
            key = prng_key(seed)
            batches = train_batches[seed]
            curve, loss_curve = [accuracy(state)], [None]
            done = 0
            for point in eval_steps[1:]:
                jax.block_until_ready(state)
                t = time.perf_counter()
                for step in range(done, point):
                    state, metrics = train_step(state, batches[step], key)
                jax.block_until_ready(state)
                window_ms.append(1e3 * (time.perf_counter() - t) / (point - done))
                done = point
                curve.append(accuracy(state))
                loss_curve.append(float(metrics["loss"]))
            curves.append(curve)
            losses.append(loss_curve)
            log(
                f"[{index}/{len(variants)}] {variant.label} seed {seed}: val acc "
                f"{curve[-1]:.4f}, train loss {loss_curve[-1]:.3f}"
            )
        finals = [c[-1] for c in curves]
        mean, std = reports.mean_std(finals)
        row = {
            "label": variant.label,
            "conv": variant.conv,
            "conv_kwargs": dict(variant.conv_kwargs),
            **counts,
            "accuracy": curves,
            "train_loss": losses,
            "final_accuracy": finals,
            "final_accuracy_mean": mean,
            "final_accuracy_std": std,
            "ms_per_step": float(np.median(window_ms)),
            "compile_s": compile_s,
        }
        rows.append(row)
        log(
            f"[{index}/{len(variants)}] {variant.label}: {counts['conv_params']:,} conv params, "
            f"{counts['conv_macs'] / 1e6:.2f} conv MMACs, final val acc {mean:.4f} +- {std:.4f}, "
            f"{row['ms_per_step']:.1f} ms/step (compile {compile_s:.1f}s)"
        )
    return {
        "config": dataclasses.asdict(config),
        "dataset": {"name": info.name, "num_classes": num_classes, "eval_split": eval_split,
                    "train_examples": info.num_examples(config.train_split),
                    "eval_examples": info.num_examples(eval_split)},
        "eval_steps": eval_steps,
        "device": reports.describe_device(),
        "jax_version": jax.__version__,
        "wall_s": time.perf_counter() - start,
        "variants": rows,
    }


def _fmt_count(n: float) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}k"
    return f"{n:.0f}"


def markdown_table(result: Mapping[str, Any]) -> str:
    """The study's table: design, params, MACs, final accuracy (mean ± std over seeds), ms/step."""
    config = result["config"]
    n = len(config["seeds"])
    lines = [
        f"| design | conv params | model params | conv MACs | model MACs | final val. accuracy "
        f"(mean ± std, {n} seed{'s' if n != 1 else ''}) | ms / step |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["variants"]:
        lines.append(
            f"| {row['label']} | {row['conv_params']:,} | {row['params']:,} | "
            f"{row['conv_macs']:,} | {row['macs']:,} | "
            f"{100 * row['final_accuracy_mean']:.1f}% ± {100 * row['final_accuracy_std']:.1f} | "
            f"{row['ms_per_step']:.1f} |"
        )
    return "\n".join(lines)


def describe(result: Mapping[str, Any]) -> str:
    """One paragraph: what was trained, on what, with which budget."""
    c, d = result["config"], result["dataset"]
    return (
        f"SmallConvNet (2 conv blocks: design conv {c['kernel_size']}x{c['kernel_size']} -> BN -> "
        f"ReLU -> 2x2 max-pool, widths {list(c['widths'])}; dense {c['hidden']} -> dropout "
        f"{c['dropout_rate']} -> {d['num_classes']}) on {d['name']} at {c['image_size']}x"
        f"{c['image_size']}: {c['steps']} steps of batch {c['batch_size']} from "
        f"'{c['train_split']}' ({d['train_examples']:,} examples), Adam with learning rate "
        f"{c['learning_rate']} cosine-decayed to 0, augment '{c['augment']}'; validation "
        f"accuracy on '{d['eval_split']}' ({d['eval_examples']:,} examples) every "
        f"{c['eval_every']} steps; seeds {list(c['seeds'])} (init, dropout and data order). "
        f"MACs are per image at {c['image_size']}x{c['image_size']}, by formula; ms / step is the "
        f"median over evaluation windows of the compiled train step on {result['device']}."
    )


def plot(result: Mapping[str, Any], path: str) -> None:
    """Validation accuracy against step: mean over seeds, shaded min-max spread, one line each.

    Left: the whole run on a 0-100% scale; right: the second half of training, zoomed in.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(12, 5.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax_full, ax_zoom = fig.subplots(1, 2, width_ratios=(3, 2))
    steps = np.asarray(result["eval_steps"])
    late = steps >= steps[-1] / 2
    c, d = result["config"], result["dataset"]
    n = len(c["seeds"])
    zoom_lo, zoom_hi = 100.0, 0.0
    for i, row in enumerate(result["variants"]):
        acc = 100 * np.asarray(row["accuracy"], np.float64)
        color = f"C{i % 10}"
        label = (
            f"{row['label']} ({_fmt_count(row['conv_params'])} conv / "
            f"{_fmt_count(row['params'])} params): {100 * row['final_accuracy_mean']:.1f}%"
        )
        for ax, keep in ((ax_full, slice(None)), (ax_zoom, late)):
            ax.plot(steps[keep], acc.mean(0)[keep], color=color, lw=1.8, marker=".", ms=4,
                    label=label if ax is ax_full else None)
            if n > 1:
                ax.fill_between(steps[keep], acc.min(0)[keep], acc.max(0)[keep], color=color,
                                alpha=0.15, lw=0)
        zoom_lo = min(zoom_lo, float(acc[:, late].min()))
        zoom_hi = max(zoom_hi, float(acc[:, late].max()))
    fig.suptitle(
        f"Conv designs in a small convnet: {d['name']} {c['image_size']}x{c['image_size']}, "
        f"K={c['kernel_size']}, widths {list(c['widths'])}, batch {c['batch_size']}, "
        f"{c['steps']} steps; mean over {n} seed{'s' if n != 1 else ''}"
        + (" (shaded: min-max over seeds)" if n > 1 else ""),
        fontsize=10,
    )
    for ax in (ax_full, ax_zoom):
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_full.set_ylabel(f"validation accuracy on '{d['eval_split']}' (%)")
    ax_full.set_xlim(steps[0], steps[-1])
    ax_full.set_ylim(0, 100)
    ax_full.legend(loc="lower right", fontsize=8, title="design (params): final accuracy",
                   title_fontsize=8)
    ax_zoom.set_title("second half, zoomed", fontsize=9)
    ax_zoom.set_xlim(steps[late][0], steps[-1])
    margin = max(0.5, 0.05 * (zoom_hi - zoom_lo))
    ax_zoom.set_ylim(max(0.0, zoom_lo - margin), min(100.0, zoom_hi + margin))
    fig.savefig(path, dpi=110)


def write_outputs(
    result: Mapping[str, Any], output_dir: str, name: str = OUTPUT_NAME, command: str | None = None
) -> dict[str, str]:
    """Writes ``{name}.png``, ``{name}.md`` and ``{name}.json`` into ``output_dir``."""
    os.makedirs(output_dir, exist_ok=True)
    paths = {ext: os.path.join(output_dir, f"{name}.{ext}") for ext in ("png", "md", "json")}
    plot(result, paths["png"])
    lines = [f"# Kernel-design study ({result['dataset']['name']})", "",
             f"![validation accuracy against step]({name}.png)", "", describe(result), "",
             markdown_table(result), ""]
    reports.write_report(paths, lines, f"Wall time: {result['wall_s']:.0f} s (jax "
                         f"{result['jax_version']}).", result, command)
    return paths


__all__ = [
    "StudyConfig",
    "Variant",
    "build_model",
    "describe",
    "make_train_step",
    "markdown_table",
    "plot",
    "run_study",
    "write_outputs",
]
