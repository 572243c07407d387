"""Learning-rate schedules and the optax optimiser built from a config."""

from __future__ import annotations

import flax.traverse_util
import ml_collections
import optax


def peak_learning_rate(config: ml_collections.ConfigDict) -> float:
    """``learning_rate`` scaled linearly from ``lr_batch_size`` to the global ``batch_size``."""
    return config.learning_rate * config.batch_size / config.lr_batch_size


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int):
    """Linear warm-up from 0, then step decay (at ``lr_decay_epochs``), cosine to 0, or constant."""
    peak = peak_learning_rate(config)
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    if config.schedule == "step":
        boundaries = {
            int(round(e * steps_per_epoch)) - warmup: config.lr_decay_factor
            for e in config.lr_decay_epochs
        }
        main = optax.piecewise_constant_schedule(peak, boundaries)
    elif config.schedule == "cosine":
        main = optax.cosine_decay_schedule(peak, max(1, total_steps - warmup))
    else:
        main = optax.constant_schedule(peak)
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def create_optimizer(config: ml_collections.ConfigDict, schedule) -> optax.GradientTransformation:
    """SGD with momentum and coupled weight decay (PyTorch's ``SGD(weight_decay=...)``).

    Optional global-norm clipping first; with ``freeze_backbone`` only the classifier (``fc``)
    is updated.
    """
    parts = []
    if config.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
    if config.weight_decay > 0:
        parts.append(optax.add_decayed_weights(config.weight_decay))
    parts.append(optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov))
    tx = optax.chain(*parts)
    if config.freeze_backbone:
        def labels(params):
            flat = flax.traverse_util.flatten_dict(params)
            return flax.traverse_util.unflatten_dict(
                {k: "train" if k[0] == "fc" else "freeze" for k in flat})
        tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
    return tx
