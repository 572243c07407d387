"""What the studies (:mod:`pyconv_jax.study`, :mod:`pyconv_jax.finetune_study`) share when
they summarise runs and write them out."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """The mean and the sample standard deviation (0 for a single value)."""
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else 0.0


def describe_device() -> str:
    """The first JAX device and the host, e.g. ``cpu, 2 host cores, x86_64``."""
    import jax

    dev = jax.devices()[0]
    kind = "" if dev.device_kind.lower() == dev.platform else f" ({dev.device_kind})"
    return f"{dev.platform}{kind}, {os.cpu_count()} host cores, {platform.machine()}"


def _write_atomically(path: str, text: str) -> None:
    """Writes ``path`` whole or not at all: a killed run leaves the previous file, never half."""
    partial = f"{path}.partial"
    with open(partial, "w") as f:
        f.write(text)
    os.replace(partial, path)


def write_report(paths: Mapping[str, str], lines: Sequence[str], footer: str,
                 result: Mapping[str, Any], command: str | None) -> None:
    """Writes ``paths["md"]`` (``lines``, the ``command`` that made them, then ``footer``) and
    ``paths["json"]`` (``result`` and the command)."""
    text = list(lines)
    if command:
        text += ["Command:", "", "```", command, "```", ""]
    text.append(footer)
    _write_atomically(paths["md"], "\n".join(text) + "\n")
    _write_atomically(paths["json"], json.dumps({**result, "command": command}, indent=1))
