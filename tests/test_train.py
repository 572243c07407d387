"""Training system: configs, compile-once steps, resume, device/process invariance, metrics, errors."""

import glob
import json
import os
import shutil

import jax
import numpy as np
import pytest

from pyconv_jax import checkpoint as ckpt
from pyconv_jax import data
from pyconv_jax.models import create_model
from pyconv_jax.train import config as config_lib
from pyconv_jax.train import train_and_evaluate
from tests.train_helpers import (ROOT, TINY, assert_trees_equal, final_params, free_port,
                                 load_config, params_at, run_script)

@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))),
                         ids=os.path.basename)
def test_every_config_loads_and_builds_its_model(path):
    config = load_config(path)
    config_lib.validate_config(config)
    assert config.augment in data.AUGMENTATIONS
    model = create_model(config.model, **config_lib.model_overrides(config, num_classes=1000))
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), np.float32)  # full size is checked in test_models
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros(x.shape, np.float32)))
    assert jax.eval_shape(model.apply, variables, x).shape == (2, 1000)


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("model", "pyconvresnet51", "unknown model 'pyconvresnet51'"),
        ("schedule", "linear", "config.schedule='linear' is not one of"),
        ("batch_size", 0, "config.batch_size must be > 0"),
        ("eval_resize", 8, "config.eval_resize=8 is smaller than config.image_size=16"),
    ],
)
def test_invalid_config_values_fail_fast(key, value, message):
    config = load_config(TINY)
    config[key] = value
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        config_lib.validate_config(config)


def test_steps_compile_once(tiny_run):
    _, _, records = tiny_run
    compiles = [r for r in records if r.startswith("Compiling")]
    assert sum("train_step" in r for r in compiles) == 1, compiles
    assert sum("eval_step" in r for r in compiles) == 1, compiles  # two evaluations, one compile


def test_metrics_and_checkpoints_written(tiny_run):
    workdir, metrics, _ = tiny_run
    lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    train = [r for r in lines if "train_loss" in r]
    evals = [r for r in lines if "eval_top1" in r]
    assert [r["step"] for r in train] == [2, 4, 6]
    assert all({"train_loss", "learning_rate"} <= set(r) for r in train)
    assert [r["step"] for r in evals] == [3, 6]
    assert evals[-1]["eval_examples"] == 360  # the whole digits test split, padding masked
    assert metrics["eval_top1"] == evals[-1]["eval_top1"]
    assert glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
    manager = ckpt.open_manager(os.path.join(workdir, "checkpoints"), create=False)
    assert manager.all_steps() == [2, 4, 6]
    meta = ckpt.read_meta(os.path.join(workdir, "checkpoints"))
    assert meta["model"] == "pyconvresnet18" and meta["model_kwargs"]["num_classes"] == 10


def test_restart_resumes_at_the_right_step_with_the_same_state(tiny_run, tmp_path):
    workdir, _, _ = tiny_run
    resumed = str(tmp_path / "b")
    shutil.copytree(workdir, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "6"))  # as if stopped after step 4's save
    train_and_evaluate(load_config(TINY), resumed)
    # bitwise: same data order, RNG, optimizer state
    assert_trees_equal(final_params(workdir), final_params(resumed))
    lines = [json.loads(line) for line in open(os.path.join(resumed, "metrics.jsonl"))]
    lr_at_6 = [r["learning_rate"] for r in lines if r.get("step") == 6 and "learning_rate" in r]
    assert len(set(lr_at_6)) == 1 and len(lr_at_6) == 2  # the original and the resumed log agree


def test_one_device_four_devices_and_two_processes_agree(tmp_path):
    """The same global batches on 1 device, 4 devices, and 2 processes x 2 devices.

    Rounding differs (the reductions are split differently), and in this tiny net (stage 4 is
    1x1 spatial, so BatchNorm normalises 16 numbers) it grows fast with training: one step's
    parameters agree to ~1e-5 of each tensor's scale after step 1, then the gap grows ~10-20x per
    step (measured: 8e-6, 5e-5, 9e-4 at steps 1-3), so the runs are compared after step 1, where a
    bug (per-device BatchNorm statistics, a wrong data shard, a mis-summed gradient) would show
    as a difference of order 1e-2 or more.
    """
    port = free_port()
    # The data order of a 2-process run, on any layout; a checkpoint after every step.
    shards = ["--config.input_shards=2", "--config.checkpoint_every_steps=1",
              "--config.num_train_steps=2"]
    procs = {
        "one": [run_script(str(tmp_path / "one"), *shards, devices=1)],
        "four": [run_script(str(tmp_path / "four"), *shards, devices=4)],
        "two": [
            run_script(str(tmp_path / "two"), "--coordinator_address", f"localhost:{port}",
                       "--num_processes", "2", "--process_id", str(i), *shards[1:], devices=2)
            for i in range(2)
        ],
    }
    for name, group in procs.items():
        for proc in group:
            out, _ = proc.communicate(timeout=600)
            assert proc.returncode == 0, out[-3000:]
    reference = params_at(str(tmp_path / "one"), 1)
    for name in ("four", "two"):
        got = params_at(str(tmp_path / name), 1)
        for a, b in zip(jax.tree_util.tree_leaves(reference), jax.tree_util.tree_leaves(got)):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * max(1.0, np.abs(a).max()),
                                       err_msg=name)


def test_bad_arguments_exit_2_with_one_line(tmp_path):
    proc = run_script(str(tmp_path / "w"), "--config.model=pyconvresnet51")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2
    assert "error: unknown model 'pyconvresnet51'; choose one of:" in out
    proc = run_script(str(tmp_path / "w"), "--config.batch_size=18", devices=4)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2
    assert "config.batch_size=18 is not divisible by the 4 devices; use a multiple of 4." in out


def test_evaluate_checkpoint_reproduces_the_training_eval(tiny_run):
    from pyconv_jax.evaluation import evaluate_checkpoint

    workdir, metrics, _ = tiny_run
    again = evaluate_checkpoint(workdir, dataset="digits", split="test", resize=16, crop=16,
                                batch_size=100)
    assert again["eval_examples"] == 360
    assert again["eval_top1"] == pytest.approx(metrics["eval_top1"], abs=1e-6)
    assert again["eval_loss"] == pytest.approx(metrics["eval_loss"], rel=1e-4)
    with pytest.raises(ValueError, match="predicts 10 classes but"):
        evaluate_checkpoint(workdir, dataset="imagefolder:" + make_image_folder(workdir, 3),
                            split="train", resize=16, crop=16)


def make_image_folder(root, num_classes):
    from PIL import Image

    folder = os.path.join(root, "folder")
    for c in range(num_classes):
        os.makedirs(os.path.join(folder, "train", f"c{c}"), exist_ok=True)
        Image.new("RGB", (20, 20), (40 * c, 0, 0)).save(os.path.join(folder, "train", f"c{c}", "a.png"))
    return folder


def test_predict_prints_class_names(tiny_run, tmp_path):
    from PIL import Image
    from sklearn.datasets import load_digits

    from pyconv_jax.evaluation import predict_files

    path = str(tmp_path / "digit.png")
    Image.fromarray((load_digits().images[0] * 15).astype("uint8")).save(path)
    (top,) = predict_files(tiny_run[0], [path], resize=16, crop=16)
    assert len(top) == 5 and {name for name, _ in top} <= {str(i) for i in range(10)}
    assert 0.999 >= top[0][1] >= top[-1][1] > 0
    bad = tmp_path / "not_an_image.jpg"
    bad.write_text("hello")
    with pytest.raises(ValueError, match="cannot read .* as an image"):
        predict_files(tiny_run[0], [str(bad)], resize=16, crop=16)


def test_sigterm_saves_the_current_step_and_exits_cleanly(tmp_path):
    import signal
    import time

    workdir = str(tmp_path / "w")
    proc = run_script(workdir, "--config.num_train_steps=400", "--config.checkpoint_every_steps=1000",
                      "--config.eval_every_steps=1000")
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 400
    while not (os.path.exists(metrics) and open(metrics).read().count("\n") >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    steps_saved = ckpt.open_manager(os.path.join(workdir, "checkpoints"), create=False).all_steps()
    assert len(steps_saved) == 1 and 4 <= steps_saved[0] < 400  # the step it was at, not 1000
    logged = [json.loads(line)["step"] for line in open(metrics)]
    assert max(logged) == steps_saved[0]  # the last partial window is logged at the stop
    # The next start continues from the saved step.
    proc = run_script(workdir, f"--config.num_train_steps={steps_saved[0] + 2}")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert f"from step {steps_saved[0]}" in out


def test_init_from_reinitialises_a_new_head_and_can_freeze_the_backbone(tiny_run, tmp_path):
    source = os.path.join(tiny_run[0], "checkpoints")
    config = load_config(TINY)
    config.dataset = "imagefolder:" + make_image_folder(str(tmp_path), 3)
    config.train_split = config.eval_split = "train"
    config.batch_size, config.eval_batch_size = 3, 3
    config.num_train_steps, config.log_every_steps = 2, 1
    config.init_from, config.freeze_backbone = source, True
    train_and_evaluate(config, str(tmp_path / "ft"))
    loaded, tuned = final_params(tiny_run[0]), final_params(str(tmp_path / "ft"))
    assert tuned["params"]["fc"]["kernel"].shape == (128, 3)  # re-initialised for 3 classes
    for name in ("conv1", "layer1_0", "layer4_1"):  # frozen: exactly the loaded weights
        for a, b in zip(jax.tree_util.tree_leaves(loaded["params"][name]),
                        jax.tree_util.tree_leaves(tuned["params"][name])):
            np.testing.assert_array_equal(a, b)
