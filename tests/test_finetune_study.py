"""Fast checks of the fine-tuning study's set-up (the study itself: scripts/finetune_study.py)."""

import importlib.util

import numpy as np
import torch

from pyconv_jax import finetune_study


def _digits_config():
    spec = importlib.util.spec_from_file_location("digits_cfg", finetune_study.DIGITS_CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config().to_dict()


def test_every_arm_trains_the_digits_recipe_and_differs_only_in_its_start():
    study = finetune_study.FinetuneStudyConfig(steps=40, seeds=(0, 5))
    recipe = _digits_config()
    scratch = finetune_study.load_target_config(study, seed=5).to_dict()
    tuned = finetune_study.load_target_config(study, seed=5, init_from="/ckpt").to_dict()
    changed = {k for k in recipe if recipe[k] != scratch[k]}
    assert changed <= {"num_train_steps", "seed", "eval_every_steps", "log_every_steps",
                       "checkpoint_every_steps", "keep_checkpoints", "async_checkpoints"}
    assert (scratch["num_train_steps"], scratch["seed"]) == (40, 5)
    assert {k for k in scratch if scratch[k] != tuned[k]} == {"init_from"}
    assert tuned["init_from"] == "/ckpt" and not tuned["freeze_backbone"]


def test_source_model_zero_inits_exactly_the_last_batchnorm_of_every_block():
    study = finetune_study.FinetuneStudyConfig()
    model = finetune_study.new_torch_model(study, num_classes=5)
    zeroed = {name for name, p in model.named_parameters()
              if name.endswith(".weight") and p.ndim == 1 and not p.any()}
    blocks = [f"layer{s}.{i}" for s in range(1, 5) for i in range(2)]  # PyConvResNet-18: 2x4
    assert zeroed == {f"{b}.bn2.weight" for b in blocks}
    # Seeded: the control arm's untrained model is the source model before training.
    again = finetune_study.untrained_torch_model(study, num_classes=5)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_select_classes_and_accuracy_by_group():
    labels = np.array([0, 7, 4, 9, 2, 5])
    images = np.arange(6, dtype=np.float32)[:, None]
    x, y = finetune_study.select_classes(images, labels, (2, 4))
    np.testing.assert_array_equal(x[:, 0], [2, 4])
    np.testing.assert_array_equal(y, [1, 0])  # relabelled 0 .. n-1 in class order
    logits = np.eye(10)[[0, 7, 1, 9, 2, 6]]  # right, right, wrong (seen), right, right, wrong
    acc = finetune_study.accuracy_by_group(logits, labels, seen=(0, 1, 2, 3, 4))
    assert acc == {"top1": 4 / 6, "top1_seen": 2 / 3, "top1_unseen": 2 / 3}
