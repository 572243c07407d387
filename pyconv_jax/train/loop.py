"""``train_and_evaluate(config, workdir)``: the training job, on any number of devices and hosts.

Order of events: validate the config; build the mesh (all devices of all processes, one ``data``
axis); read the dataset's size and classes; build the model and optimiser; create the state
directly in its replicated layout (``jit(init, out_shardings=...)``); resume from the workdir's
latest checkpoint if there is one, else start from ``config.init_from`` if set, else from scratch;
then train, logging every ``log_every_steps``, evaluating and checkpointing on schedule, and save a
final checkpoint. A SIGTERM/SIGINT saves a checkpoint at the current step and returns.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
from typing import Any, Iterator

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pyconv_jax import checkpoint as ckpt
from pyconv_jax import data
from pyconv_jax.models import create_model
from pyconv_jax.train import config as config_lib
from pyconv_jax.train import optim, steps
from pyconv_jax.train.metrics import MetricsWriter, Progress

log = logging.getLogger("pyconv_jax.train")


def make_mesh() -> Mesh:
    """A 1-D mesh over every device of every process, axis ``data``."""
    return Mesh(np.asarray(jax.devices()), ("data",))


def check_batch_sizes(config: ml_collections.ConfigDict) -> None:
    for key in ("batch_size", "eval_batch_size"):
        if config[key] % jax.device_count():
            raise ValueError(
                f"config.{key}={config[key]} is not divisible by the {jax.device_count()} devices; "
                f"use a multiple of {jax.device_count()}."
            )


def to_global(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Assembles each process's local batch into one global array sharded on ``data``."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def prefetch_to_device(iterator: Iterator, sharding: NamedSharding, size: int = 2) -> Iterator:
    """Keeps ``size`` batches in flight to the devices while the current step runs."""
    queue: collections.deque = collections.deque()
    for batch in iterator:
        queue.append(to_global(batch, sharding))
        if len(queue) >= size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


class _StopRequest:
    """Turns a preemption notice into a stop at a step every process agrees on.

    One process: SIGTERM/SIGINT set a flag checked between steps (save, then exit cleanly).
    Several processes: each must save the same step, so SIGTERM is left to JAX's preemption
    service (started by ``jax.distributed.initialize``), which propagates a notice received by any
    process to all of them and picks the step; :meth:`at` asks it every step. A Python SIGTERM
    handler would replace that service's, so none is installed then; SIGINT keeps its default.
    """

    def __init__(self):
        self.requested = False
        self._previous = {}
        self._multiprocess = jax.process_count() > 1

    def __enter__(self):
        for sig in () if self._multiprocess else (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.requested = True
        log.warning("received signal %d: saving a checkpoint at the current step, then stopping", signum)

    def at(self, step: int) -> bool:
        """Whether to save and stop after ``step`` (called once per step, by every process)."""
        if self._multiprocess and not self.requested:
            from jax.experimental import multihost_utils

            self.requested = multihost_utils.reached_preemption_sync_point(step)
            if self.requested:
                log.warning("preemption notice: every process saves at step %d, then stops", step)
        return self.requested

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train_batches(config: ml_collections.ConfigDict, start_step: int) -> Iterator[dict]:
    """This process's part of each global training batch, resumable at ``start_step``.

    The data is cut into ``config.input_shards`` shards (default: one per process); each process
    reads its shards and concatenates them, so the global batch depends only on the shard count.
    """
    shards = config.input_shards or jax.process_count()
    if shards % jax.process_count() or config.batch_size % shards:
        raise ValueError(
            f"config.input_shards={shards} must be a multiple of the {jax.process_count()} "
            f"processes and divide config.batch_size={config.batch_size}.")
    per_process = shards // jax.process_count()
    iterators = [
        data.create_train_iterator(
            config.dataset, split=config.train_split, data_dir=config.data_dir,
            image_size=config.image_size, local_batch_size=config.batch_size // shards,
            seed=config.seed, process_index=jax.process_index() * per_process + j,
            process_count=shards, augment=config.augment, start_step=start_step,
            shuffle_buffer=config.shuffle_buffer)
        for j in range(per_process)
    ]
    if len(iterators) == 1:
        return iterators[0]
    return ({k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            for parts in zip(*iterators))


def _split_state(state: steps.TrainState) -> dict[str, Any]:
    return {
        ckpt.MODEL: {"params": state.params, "batch_stats": state.batch_stats},
        ckpt.TRAIN: {"step": state.step, "opt_state": state.opt_state},
    }


def save_checkpoint(manager: ocp.CheckpointManager, state: steps.TrainState, meta: dict) -> None:
    """Saves ``state`` at its step, with the checksums that a restore verifies."""
    parts = _split_state(state)
    step = int(jax.device_get(state.step))
    meta = dict(meta, checksums={name: ckpt.tree_checksum(tree) for name, tree in parts.items()})
    manager.save(step, args=ocp.args.Composite(**{
        ckpt.MODEL: ocp.args.StandardSave(parts[ckpt.MODEL]),
        ckpt.TRAIN: ocp.args.StandardSave(parts[ckpt.TRAIN]),
        ckpt.META: ocp.args.JsonSave(meta),
    }))


def restore_checkpoint(
    manager: ocp.CheckpointManager, abstract_state: steps.TrainState, meta: dict, step: int
) -> steps.TrainState:
    """Restores ``step`` into the layout of ``abstract_state``, verified against its checksums.

    Raises :class:`~pyconv_jax.checkpoint.CheckpointMismatchError` for another model's checkpoint,
    and any other exception for a damaged one.
    """
    saved = manager.restore(step, args=ocp.args.Composite(**{ckpt.META: ocp.args.JsonRestore()}))
    saved_meta = saved[ckpt.META]
    for key in ("model", "model_kwargs"):
        if saved_meta.get(key) != meta[key]:
            raise ckpt.CheckpointMismatchError(
                f"the checkpoint at step {step} in {manager.directory} was written for "
                f"{key}={saved_meta.get(key)!r}, but this config asks for {meta[key]!r}; use "
                "a new --workdir or the matching config."
            )
    targets = _split_state(abstract_state)
    restored = manager.restore(step, args=ocp.args.Composite(**{
        name: ocp.args.StandardRestore(tree) for name, tree in targets.items()
    }))
    where = f"checkpoint {manager.directory} step {step}"
    for name in (ckpt.MODEL, ckpt.TRAIN):
        ckpt.verify_checksum(saved_meta, name, restored[name], where)
    model_vars, train_vars = restored[ckpt.MODEL], restored[ckpt.TRAIN]
    return abstract_state.replace(
        step=train_vars["step"], opt_state=train_vars["opt_state"],
        params=model_vars["params"], batch_stats=model_vars["batch_stats"],
    )


def resume_latest_intact(open_manager, abstract_state: steps.TrainState, meta: dict):
    """``(manager, state)`` from the newest checkpoint that restores intact; state None if none.

    A step that fails to restore or to verify is moved aside (:func:`ckpt.quarantine_step`) with a
    warning and the previous one tried, so a damaged file costs the steps since the previous
    checkpoint, never the run. Another model's checkpoint is an error, not damage.
    """
    manager = open_manager()
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            return manager, restore_checkpoint(manager, abstract_state, meta, step)
        except ckpt.CheckpointMismatchError:
            raise
        except Exception as error:  # noqa: BLE001 - any failure to read back means damage
            reason = " ".join(str(error).split())[:300]
            manager.close()
            if jax.process_index() == 0:
                moved = ckpt.quarantine_step(str(manager.directory), step)
                log.warning("checkpoint step %d in %s is damaged (%s: %s); moved it to %s and "
                            "trying the previous one", step, manager.directory,
                            type(error).__name__, reason, moved)
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices(f"quarantined checkpoint {step}")
            manager = open_manager()
    return manager, None


def merge_pretrained(params: Any, batch_stats: Any, init_from: str) -> tuple[Any, Any, list[str]]:
    """Takes every variable from the checkpoint ``init_from`` except a classifier of another shape.

    Returns the merged ``(params, batch_stats)`` and the names of re-initialised variables.
    Anything else missing or mis-shaped raises, listing the offending names.
    """
    _, loaded = ckpt.restore_model_variables(init_from)
    reinitialised, problems = [], []
    merged = {}
    for collection, fresh in (("params", params), ("batch_stats", batch_stats)):
        fresh_flat = flax.traverse_util.flatten_dict(jax.device_get(fresh), sep="/")
        loaded_flat = flax.traverse_util.flatten_dict(jax.device_get(loaded[collection]), sep="/")
        out = {}
        for name, value in fresh_flat.items():
            src = loaded_flat.get(name)
            if src is not None and src.shape == value.shape:
                out[name] = src
            elif name.startswith("fc/"):
                out[name] = value
                reinitialised.append(f"{collection}/{name}")
            else:
                problems.append(f"{collection}/{name}: " + ("missing" if src is None else
                                f"shape {src.shape} != {value.shape}"))
        merged[collection] = flax.traverse_util.unflatten_dict(out, sep="/")
    if problems:
        raise ValueError(
            f"config.init_from={init_from!r} does not fit this model ({len(problems)} problems, "
            f"first: {problems[:3]}); start from a checkpoint of the same architecture."
        )
    return merged["params"], merged["batch_stats"], reinitialised


def evaluate(
    state, eval_step_fn, sharding: NamedSharding, *, dataset: str, split: str,
    data_dir: str | None, image_size: int, resize_size: int, batch_size: int,
) -> dict[str, float]:
    """Loss, top-1 and top-5 over every example of ``split`` (padding masked out).

    ``batch_size`` is global; each process reads and evaluates its own share.
    """
    iterator = data.create_eval_iterator(
        dataset, split=split, data_dir=data_dir, image_size=image_size, resize_size=resize_size,
        local_batch_size=batch_size // jax.process_count(),
        process_index=jax.process_index(), process_count=jax.process_count(),
    )
    totals = None
    for batch in prefetch_to_device(iter(iterator), sharding):
        sums = eval_step_fn(state, batch)
        totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = max(float(totals["count"]), 1.0)
    return {
        "eval_loss": float(totals["loss"]) / count,
        "eval_top1": float(totals["top1"]) / count,
        "eval_top5": float(totals["top5"]) / count,
        "eval_examples": float(totals["count"]),
    }


def _check_finite(pending: list[tuple[int, dict]], skip_nonfinite: bool) -> int:
    """Returns how many of the pending steps were non-finite; raises unless they may be skipped."""
    bad = [step for step, m in pending if not bool(m["finite"])]
    if bad and not skip_nonfinite:
        raise FloatingPointError(
            f"non-finite loss or gradients at step {bad[0]} (and {len(bad) - 1} more since the last "
            "log); no checkpoint was written after the last good one. Lower config.learning_rate, "
            "set config.grad_clip_norm, or set config.skip_nonfinite_updates=True."
        )
    return len(bad)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains and evaluates ``config`` in ``workdir``; returns the final eval metrics."""
    config_lib.validate_config(config)
    check_batch_sizes(config)
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as error:
        raise PermissionError(f"cannot create workdir {workdir!r} ({error.strerror}); choose a "
                              "writable --workdir.") from None
    if not os.access(workdir, os.W_OK):
        raise PermissionError(f"cannot write to workdir {workdir!r}; choose a writable --workdir.")

    mesh = make_mesh()
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P("data"))

    info = data.get_dataset_info(config.dataset, config.data_dir)
    steps_per_epoch = max(1, info.num_examples(config.train_split) // config.batch_size)
    total_steps = (config.num_train_steps if config.num_train_steps > 0
                   else int(round(config.num_epochs * steps_per_epoch)))
    eval_every = config.eval_every_steps if config.eval_every_steps > 0 else steps_per_epoch

    model_kwargs = config_lib.model_overrides(config, info.num_classes)
    model = create_model(config.model, **model_kwargs)
    meta = ckpt.make_meta(config.model, model_kwargs, dataset=config.dataset)
    schedule = optim.learning_rate_schedule(config, steps_per_epoch, total_steps)
    tx = optim.create_optimizer(config, schedule)

    def init_state(rng):
        images = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
        variables = model.init(rng, images, train=False)
        return steps.TrainState.create(
            apply_fn=model.apply, params=variables["params"],
            batch_stats=variables.get("batch_stats", {}), tx=tx)

    init_rng = jax.random.key(config.seed)
    abstract_state = jax.eval_shape(init_state, init_rng)
    abstract_state = jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), abstract_state)

    manager, state = resume_latest_intact(
        lambda: ckpt.open_manager(
            os.path.join(workdir, "checkpoints"), max_to_keep=config.keep_checkpoints,
            async_save=config.async_checkpoints, cleanup_tmp=True),
        abstract_state, meta)
    if state is not None:
        log.info("resumed from %s at step %d", manager.directory, int(jax.device_get(state.step)))
    else:
        state = jax.jit(init_state, out_shardings=replicated)(init_rng)
        if config.init_from:
            params, batch_stats, fresh = merge_pretrained(state.params, state.batch_stats,
                                                          config.init_from)
            state = state.replace(params=params, batch_stats=batch_stats,
                                  opt_state=tx.init(params))
            state = jax.device_put(state, replicated)
            log.info("initialised from %s%s", config.init_from,
                     f"; re-initialised for {info.num_classes} classes: {fresh}" if fresh else "")
    start_step = int(jax.device_get(state.step))

    train_step = jax.jit(
        steps.make_train_step(
            num_classes=info.num_classes, schedule=schedule, seed=config.seed,
            label_smoothing=config.label_smoothing, cutmix_prob=config.cutmix_prob,
            cutmix_alpha=config.cutmix_alpha, skip_nonfinite=config.skip_nonfinite_updates),
        in_shardings=(replicated, batch_sharding), out_shardings=(replicated, replicated),
        donate_argnums=0)
    eval_step = jax.jit(steps.eval_step, in_shardings=(replicated, batch_sharding),
                        out_shardings=replicated)

    def run_eval(state):
        return evaluate(
            state, eval_step, batch_sharding, dataset=config.dataset, split=config.eval_split,
            data_dir=config.data_dir, image_size=config.image_size,
            resize_size=config.eval_resize, batch_size=config.eval_batch_size)

    writer = MetricsWriter(workdir)
    train_iter = train_batches(config, start_step)
    batches = prefetch_to_device(train_iter, batch_sharding)
    progress = Progress(total_steps, config.batch_size, start_step)
    log.info("training %s on %s: %d steps (%d per epoch), %d devices, %d processes, from step %d",
             config.model, config.dataset, total_steps, steps_per_epoch, jax.device_count(),
             jax.process_count(), start_step)

    pending: list[tuple[int, dict]] = []
    skipped = 0
    eval_metrics: dict[str, float] = {}
    step = start_step
    with _StopRequest() as stop:
        while step < total_steps:
            state, metrics = train_step(state, next(batches))
            step += 1
            pending.append((step, metrics))
            is_last = step == total_steps
            stopping = stop.at(step)
            if step % config.log_every_steps == 0 or is_last or stopping:
                host = jax.device_get(pending)
                skipped += _check_finite(host, config.skip_nonfinite_updates)
                scalars = {
                    "train_loss": float(np.mean([m["loss"] for _, m in host])),
                    "train_top1": float(np.mean([m["top1"] for _, m in host])),
                    "learning_rate": float(host[-1][1]["learning_rate"]),
                }
                writer.write(step, scalars)
                if jax.process_index() == 0:
                    print(progress.line(step, scalars), flush=True)
                pending = []
            if step % eval_every == 0 or is_last:
                eval_metrics = run_eval(state)
                writer.write(step, eval_metrics)
                if jax.process_index() == 0:
                    print(f"step {step}: " + "  ".join(
                        f"{k}={v:.4f}" for k, v in eval_metrics.items() if k != "eval_examples"),
                        flush=True)
            if step % config.checkpoint_every_steps == 0 or is_last or stopping:
                _check_finite(jax.device_get(pending), config.skip_nonfinite_updates)
                save_checkpoint(manager, state, meta)
            if stopping:
                log.warning("stopped at step %d after a signal; the next start resumes here", step)
                break
    if not eval_metrics and step >= total_steps:  # resumed a finished run: report it again
        eval_metrics = run_eval(state)
    manager.wait_until_finished()
    manager.close()
    writer.close()
    if skipped:
        log.warning("skipped %d updates with non-finite loss or gradients", skipped)
    undecodable = data.undecodable_files()
    if undecodable:
        log.warning("%d image files failed to decode and were skipped in this process: %s",
                    len(undecodable), ", ".join(undecodable[:10]))
    if eval_metrics and jax.process_index() == 0:
        print(f"final ({config.eval_split} split, {int(eval_metrics['eval_examples'])} examples, "
              f"step {step}): top-1 {100 * eval_metrics['eval_top1']:.2f}%  "
              f"top-5 {100 * eval_metrics['eval_top5']:.2f}%  loss {eval_metrics['eval_loss']:.4f}"
              f"  [{workdir}]", flush=True)
    return eval_metrics
