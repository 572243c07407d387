"""Pure train and eval steps: ``(state, batch) -> (state, metrics)`` and ``(state, batch) -> sums``.

They are compiled once by :mod:`pyconv_jax.train.loop` with ``jax.jit`` and explicit shardings:
the batch is sharded over the ``data`` mesh axis and the state replicated, so BatchNorm statistics
and gradients are over the global batch (XLA inserts the collectives).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

Batch = dict[str, jax.Array]


class TrainState(train_state.TrainState):
    """Flax ``TrainState`` plus BatchNorm running statistics."""

    batch_stats: Any = None


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-example cross-entropy of ``logits`` ``[N, K]`` against soft ``targets`` ``[N, K]``."""
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def cutmix(rng: jax.Array, images: jax.Array, targets: jax.Array, alpha: float):
    """CutMix (Yun et al. 2019): paste a random box from the batch rolled by one, mix the targets.

    The box area is ``1 - lam`` with ``lam ~ Beta(alpha, alpha)``; targets are mixed by the area
    actually pasted (after clipping at the border).
    """
    _, h, w, _ = images.shape
    k_lam, k_y, k_x = jax.random.split(rng, 3)
    lam = jax.random.beta(k_lam, alpha, alpha)
    cut = jnp.sqrt(1.0 - lam)
    ch, cw = (cut * h).astype(jnp.int32), (cut * w).astype(jnp.int32)
    cy, cx = jax.random.randint(k_y, (), 0, h), jax.random.randint(k_x, (), 0, w)
    y0, y1 = jnp.clip(cy - ch // 2, 0, h), jnp.clip(cy + ch // 2, 0, h)
    x0, x1 = jnp.clip(cx - cw // 2, 0, w), jnp.clip(cx + cw // 2, 0, w)
    rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
    mixed = jnp.where(box[None, :, :, None], jnp.roll(images, 1, axis=0), images)
    kept = 1.0 - jnp.mean(box.astype(jnp.float32))
    return mixed, kept * targets + (1.0 - kept) * jnp.roll(targets, 1, axis=0)


def make_train_step(
    *, num_classes: int, schedule, seed: int, label_smoothing: float = 0.0,
    cutmix_prob: float = 0.0, cutmix_alpha: float = 1.0, skip_nonfinite: bool = False,
):
    """Builds the pure train step; the per-step RNG is derived from ``seed`` and ``state.step``."""

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        rng = jax.random.fold_in(jax.random.key(seed), state.step)
        k_drop, k_mix, k_apply = jax.random.split(rng, 3)
        images, labels = batch["image"], batch["label"]
        targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
        if cutmix_prob > 0:
            mixed, mixed_targets = cutmix(k_mix, images, targets, cutmix_alpha)
            apply = jax.random.bernoulli(k_apply, cutmix_prob)
            images = jnp.where(apply, mixed, images)
            targets = jnp.where(apply, mixed_targets, targets)

        def loss_fn(params):
            logits, updates = state.apply_fn(
                {"params": params, "batch_stats": state.batch_stats}, images, train=True,
                mutable=["batch_stats"], rngs={"dropout": k_drop},
            )
            return jnp.mean(cross_entropy(logits, targets)), (logits, updates["batch_stats"])

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
        if skip_nonfinite:
            new_state = jax.tree_util.tree_map(
                lambda new, old: jnp.where(finite, new, old), new_state,
                state.replace(step=state.step + 1))
        metrics = {
            "loss": loss,
            "top1": jnp.mean(jnp.argmax(logits, -1) == labels),
            "grad_norm": grad_norm,
            "learning_rate": schedule(state.step),
            "finite": finite,
        }
        return new_state, metrics

    return train_step


def eval_step(state: TrainState, batch: Batch) -> dict[str, jax.Array]:
    """Sums of loss, top-1 and top-5 hits over the unmasked examples of ``batch``."""
    logits = state.apply_fn(
        {"params": state.params, "batch_stats": state.batch_stats}, batch["image"], train=False)
    labels, mask = batch["label"], batch["mask"].astype(jnp.float32)
    num_classes = logits.shape[-1]
    loss = cross_entropy(logits, jax.nn.one_hot(labels, num_classes))
    top5 = jax.lax.top_k(logits, min(5, num_classes))[1]
    return {
        "loss": jnp.sum(loss * mask),
        "top1": jnp.sum((top5[:, 0] == labels) * mask),
        "top5": jnp.sum(jnp.any(top5 == labels[:, None], axis=-1) * mask),
        "count": jnp.sum(mask),
    }
