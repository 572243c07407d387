"""Where training metrics go: ``metrics.jsonl``, TensorBoard event files and the console.

Only process 0 writes. One JSON object per logged step, e.g.
``{"step": 1200, "train_loss": 1.93, "learning_rate": 0.1}``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax


class MetricsWriter:
    """Appends scalars to ``<workdir>/metrics.jsonl`` and TensorBoard events under ``workdir``."""

    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if self.enabled:
            import tensorflow as tf

            os.makedirs(workdir, exist_ok=True)
            self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        import tensorflow as tf

        with self._tb.as_default():
            for key, value in record.items():
                if key != "step":
                    tf.summary.scalar(key, value, step=int(step))
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


class Progress:
    """Console progress: step, loss, images/s and time left."""

    def __init__(self, total_steps: int, batch_size: int, start_step: int):
        self.total, self.batch_size = total_steps, batch_size
        self.last_step, self.last_time = start_step, time.perf_counter()

    def line(self, step: int, scalars: dict[str, float]) -> str:
        now = time.perf_counter()
        rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
        self.last_step, self.last_time = step, now
        eta = (self.total - step) / max(rate, 1e-9)
        parts = " ".join(f"{k}={v:.4g}" for k, v in scalars.items())
        return (f"step {step}/{self.total}  {parts}  {rate * self.batch_size:.1f} img/s  "
                f"ETA {int(eta) // 60}m{int(eta) % 60:02d}s")
