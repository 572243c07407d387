"""The device checks (run on a lent GPU by scripts/device_check.py) pass here on the CPU for
every lowering, and fail for a broken conv: their tolerances mean something."""

import json
import subprocess
import sys

import jax.numpy as jnp
import pytest

from pyconv_jax import device_check
from pyconv_jax.layers import grouped_conv, lowering, onednn_conv

LOWERINGS = ["grouped", "dense", "split"] + (["onednn"] if onednn_conv.available() else [])


def test_every_lowering_passes_every_pyramid_check_in_every_mode():
    cases = device_check.pyramid_cases("pyconvresnet18")
    assert [c["subject"] for c in cases[:2]] == ["pyconvresnet18 stage 1, stride 1",
                                                 "pyconvresnet18 stage 1, stride 2"]
    assert [k for k, _, _ in cases[0]["levels"]] == [3, 5, 7, 9]
    checks = device_check.check_pyramids(cases, LOWERINGS)
    runs = len(LOWERINGS) * len(device_check.MODES) - ("onednn" in LOWERINGS)  # no bfloat16
    assert len(checks) == len(cases) * runs * 3
    assert all(c.ok for c in checks), device_check.summary([c for c in checks if not c.ok])
    # float32 at highest precision is plain float32 arithmetic: far under its tolerance.
    assert max(c.error for c in checks if c.precision == "highest") < 3e-6


def _flipped(x, kernel, **kwargs):
    return grouped_conv(x, kernel[::-1, ::-1], **kwargs)


def _shifted(x, kernel, **kwargs):
    """Pads one pixel too few on the top: the output moves down by a row."""
    y = grouped_conv(x, kernel, **kwargs)
    return jnp.concatenate([y[:, :1], y[:, :-1]], axis=1)


def _one_group_dropped(x, kernel, *, groups, **kwargs):
    """The last group's outputs from nothing (zero input)."""
    per_group = x.shape[-1] // groups
    x = x.at[..., -per_group:].set(0) if groups > 1 else x * 0.99
    return grouped_conv(x, kernel, groups=groups, **kwargs)


@pytest.mark.parametrize("broken", [_flipped, _shifted, _one_group_dropped])
def test_a_broken_conv_fails_in_every_mode(broken):
    cases = [c for c in device_check.pyramid_cases("pyconvresnet18") if c["subject"].endswith(
        "stage 2, stride 2")]
    checks = device_check.check_pyramids(cases, ["grouped"], conv=broken)
    failed = {(c.dtype, c.precision) for c in checks if c.quantity == "forward" and not c.ok}
    assert failed == set(device_check.MODES)


def test_whole_model_checks_pass_beside_pytorchs_own_errors():
    checks = device_check.check_model("pyconvresnet18", ["auto"], batch_size=4, image_size=64)
    assert {(c.dtype, c.precision, c.quantity) for c in checks} == {
        (d, p, q) for d, p in device_check.MODES for q in ("logits", "param grads")}
    assert all(c.ok for c in checks), device_check.summary(checks)
    for c in checks:  # the yardstick is a real, nonzero error of PyTorch in the same mode
        assert 0 < c.yardstick < (0.5 if c.dtype == "bfloat16" else 1e-4)
    bf16_logits = next(c for c in checks if c.dtype == "bfloat16" and c.quantity == "logits")
    assert bf16_logits.error < 0.05  # the tamed network: bfloat16 rounding does not blow up


def test_a_broken_conv_inside_the_model_fails_its_check(monkeypatch):
    original = lowering.grouped_conv

    def broken(x, kernel, *, groups, **kwargs):
        if groups > 1:
            kernel = kernel[::-1, ::-1]
        return original(x, kernel, groups=groups, **kwargs)

    monkeypatch.setattr(lowering, "grouped_conv", broken)
    checks = device_check.check_model("pyconvresnet18", ["grouped"], batch_size=4, image_size=64)
    assert not any(c.ok for c in checks if c.quantity == "logits")


def test_the_script_writes_every_check_and_exits_zero_when_all_pass(tmp_path):
    out = subprocess.run(
        [sys.executable, "scripts/device_check.py", "--models", "pyconvresnet18", "--lowerings",
         "grouped", "--batch_size", "4", "--output", str(tmp_path / "checks.json")],
        capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((tmp_path / "checks.json").read_text())
    assert report["backend"] == "cpu"
    assert len(report["checks"]) == 8 * 3 * 3 + 3 * 2 and all(c["ok"] for c in report["checks"])
    assert "| pyconvresnet18 pyramids | grouped | bfloat16 | default | forward |" in out.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["checks.json"]  # written whole, no leftovers


def test_the_script_names_an_unknown_model_in_one_line():
    out = subprocess.run([sys.executable, "scripts/device_check.py", "--models", "nosuchnet"],
                         capture_output=True, text=True)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("unknown model nosuchnet: choose from")


def test_tf32_switch_sets_both_cudnn_convs_and_cublas_products():
    import torch

    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    try:
        device_check._allow_tf32(torch, False)
        assert (conv.fp32_precision, matmul.fp32_precision) == ("ieee", "ieee")
        device_check._allow_tf32(torch, True)
        assert (conv.fp32_precision, matmul.fp32_precision) == ("tf32", "tf32")
    finally:
        conv.fp32_precision, matmul.fp32_precision = before
