"""PyTorch -> Flax conversion against independent PyTorch models, load_pretrained, the script.

Every registered architecture is checked against :mod:`tests.torch_reference`:

- all 13: the reference's state_dict entries and parameters equal the published table;
- the 18/34/50 models (64x64 images) and pyconvresnet101 (32x32): random weights AND random
  BatchNorm statistics, saved to ``.pth``, converted by the script's library function, loaded with
  ``load_pretrained``: eval-mode logits equal PyTorch's;
- the other 101/152 models: the (strict) converter consumes every key and shape of a full-size
  reference state_dict and yields the published parameter count; they differ from the models
  tested on logits only in their number of blocks (the block-index renaming, e.g.
  ``layer3.22``, is covered by pyconvresnet101).
"""

import contextlib
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import pyconv_jax
from pyconv_jax import checkpoint as ckpt
from pyconv_jax import convert, pretrained
from pyconv_jax.models import MODEL_SPECS
from tests.torch_reference import build_torch_model, count_parameters, random_torch_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_MODELS = pyconv_jax.list_models()
DEEP = [n for n in ALL_MODELS if n.endswith(("101", "152"))]
DEEP_WITH_LOGITS = "pyconvresnet101"
LOGIT_MODELS = [n for n in ALL_MODELS if n not in DEEP] + [DEEP_WITH_LOGITS]
# XLA:CPU optimisation level 0 compiles a deep net ~4x faster; the arithmetic is the same.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def meta_state_dict(name, num_classes=1000):
    with torch.device("meta"):
        return build_torch_model(name, num_classes).state_dict()


def jax_logits(model, variables, images_nchw):
    """Eval-mode logits of the Flax model on PyTorch-layout images."""
    x = jnp.asarray(np.transpose(images_nchw, (0, 2, 3, 1)))
    lowered = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x)
    try:
        compiled = lowered.compile(compiler_options=FAST_COMPILE)
    except Exception:  # noqa: BLE001 - an XLA without these options: compile normally
        compiled = lowered.compile()
    return np.asarray(compiled(variables, x))


@contextlib.contextmanager
def one_torch_thread():
    """PyTorch's OpenMP threads spin badly on a shared 2-core machine (seen: 0.2 s -> 7 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def torch_logits(torch_model, images_nchw):
    with one_torch_thread(), torch.no_grad():
        return torch_model(torch.from_numpy(images_nchw)).numpy()


def random_model(name, num_classes=1000, seed=0):
    with one_torch_thread():
        return random_torch_model(name, num_classes, seed)


def images(size, seed=0):
    return np.random.default_rng(seed).normal(size=(2, 3, size, size)).astype(np.float32)


def assert_close_logits(ours, ref):
    assert ours.shape == ref.shape
    scale = float(np.abs(ref).max())
    diff = float(np.abs(ours - ref).max())
    assert diff < 1e-4 * scale, f"max |diff| {diff} vs max |logit| {scale}"
    print(f"max |diff| {diff:.3g}, max |logit| {scale:.3g}, ratio {diff / scale:.2e}")
    return diff / scale


def save_pth(path, torch_model, wrap=False):
    state = torch_model.state_dict()
    if wrap:  # the authors' training script: DataParallel prefix inside a training checkpoint
        state = {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 90,
                 "arch": "x", "best_acc1": torch.tensor(77.0)}
    torch.save(state, path)
    return str(path)


def nothing_written(path):
    return not os.path.exists(path) or not os.listdir(path)


# ------------------------------------------------------------------ the reference itself
@pytest.mark.parametrize("name", ALL_MODELS)
def test_reference_matches_published_counts(name):
    """The independent PyTorch layouts have the published state_dict entries and parameters."""
    published = MODEL_SPECS[name].published
    assert len(meta_state_dict(name)) == published.state_dict_entries
    with torch.device("meta"):
        assert count_parameters(build_torch_model(name)) == published.params


# ------------------------------------------------------------------ logits against PyTorch
@pytest.mark.parametrize("name", LOGIT_MODELS)
def test_converted_checkpoint_gives_pytorch_logits(name, tmp_path, record_property):
    size = 32 if name in DEEP else 64
    torch_model = random_model(name, seed=1)
    pth = save_pth(tmp_path / f"{name}.pth", torch_model)
    out = tmp_path / "converted"
    summary = convert.convert_torch_checkpoint(name, pth, str(out))
    assert summary["params"] == MODEL_SPECS[name].published.params
    assert summary["num_classes"] == 1000
    model, variables = pyconv_jax.load_pretrained(name, str(out))
    assert ckpt.read_meta(str(out))["source"] == f"{name}.pth"
    x = images(size)
    rel = assert_close_logits(jax_logits(model, variables, x), torch_logits(torch_model, x))
    record_property("max_rel_logit_diff", rel)


@pytest.mark.parametrize("name", [n for n in DEEP if n != DEEP_WITH_LOGITS])
def test_deep_models_convert_full_size_state_dicts(name):
    """Each other deep net's full-size state_dict converts strictly (every key and shape used)."""
    reference = meta_state_dict(name)
    state = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in reference.items()}
    variables = convert.torch_state_dict_to_flax(name, state)
    leaves = jax.tree_util.tree_leaves(variables)
    counters = sum(k.endswith("num_batches_tracked") for k in reference)
    assert len(leaves) == len(reference) - counters
    num_params = sum(a.size for a in jax.tree_util.tree_leaves(variables["params"]))
    assert num_params == MODEL_SPECS[name].published.params
    assert all(a.dtype == np.float32 for a in leaves)


def test_training_checkpoint_with_module_prefix_and_10_classes(tmp_path):
    torch_model = random_model("pyconvresnet18", num_classes=10, seed=2)
    pth = save_pth(tmp_path / "ckpt.pth.tar", torch_model, wrap=True)
    state = convert.load_torch_checkpoint(pth)
    assert "conv1.weight" in state and not any(k.startswith("module.") for k in state)
    summary = convert.convert_torch_checkpoint("pyconvresnet18", pth, str(tmp_path / "out"))
    assert summary["num_classes"] == 10
    model, variables = pyconv_jax.load_pretrained("pyconvresnet18", str(tmp_path / "out"))
    assert model.num_classes == 10 and variables["params"]["fc"]["kernel"].shape == (512, 10)
    x = images(64, seed=3)
    assert_close_logits(jax_logits(model, variables, x), torch_logits(torch_model, x))
    # Forcing another head size is a shape error naming fc, not a silent reshape.
    shape_error = r"2 mis-shaped \[fc.bias \[10\] \(expected \[1000\]\), fc.weight \[10, 512\]"
    with pytest.raises(ValueError, match=shape_error):
        convert.torch_state_dict_to_flax("pyconvresnet18", state, num_classes=1000)


# ------------------------------------------------------------------ errors
@pytest.fixture(scope="module")
def resnet18_pth(tmp_path_factory):
    path = tmp_path_factory.mktemp("resnet18") / "resnet18.pth"
    return save_pth(path, random_model("resnet18"))


def _edit_state(pth, tmp_path, edit):
    state = torch.load(pth, weights_only=True)
    edit(state)
    return save_pth_dict(tmp_path / "edited.pth", state)


def save_pth_dict(path, state):
    torch.save(state, path)
    return str(path)


def _truncate(pth, tmp_path):
    with open(pth, "rb") as f:
        data = f.read()
    path = tmp_path / "truncated.pth"
    path.write_bytes(data[: len(data) // 2])
    return str(path)


def _drop_keys(state):
    del state["layer2.0.downsample.0.weight"], state["fc.bias"]


def _add_key(state):
    state["layer5.0.conv1.weight"] = torch.zeros(3, 3, 1, 1)


def _misshape(state):
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)


MISMATCHES = {
    # case: (arch, how to make the file, phrases the message must contain)
    "wrong_arch": ("resnet34", lambda pth, tmp: pth,
                   ["does not match resnet34",
                    "80 missing [layer1.2.bn1.bias, layer1.2.bn1.running_mean",
                    "use --arch resnet18"]),
    "truncated": ("resnet18", _truncate, ["could not read", "truncated or corrupt"]),
    "missing_keys": ("resnet18", lambda pth, tmp: _edit_state(pth, tmp, _drop_keys),
                     ["2 missing [fc.bias, layer2.0.downsample.0.weight]", "--arch"]),
    "extra_keys": ("resnet18", lambda pth, tmp: _edit_state(pth, tmp, _add_key),
                   ["1 unexpected [layer5.0.conv1.weight]"]),
    "misshaped": ("resnet18", lambda pth, tmp: _edit_state(pth, tmp, _misshape),
                  ["1 mis-shaped [layer1.0.conv1.weight [64, 64, 1, 1] (expected [64, 64, 3, 3])",
                   "shapes differ"]),
    "not_a_state_dict": ("resnet18",
                         lambda pth, tmp: save_pth_dict(tmp / "list.pth", [torch.zeros(1)]),
                         ["not a state_dict"]),
}


@pytest.mark.parametrize("case", sorted(MISMATCHES))
def test_mismatched_file_raises_clear_error_and_writes_nothing(case, resnet18_pth, tmp_path):
    arch, make, phrases = MISMATCHES[case]
    pth = make(resnet18_pth, tmp_path)
    out = str(tmp_path / "out")
    with pytest.raises(ValueError) as info:
        convert.convert_torch_checkpoint(arch, pth, out)
    message = str(info.value)
    for phrase in phrases:
        assert phrase in message, message
    assert "\n" not in message
    assert nothing_written(out)


def test_missing_file_and_unknown_arch(resnet18_pth, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert.convert_torch_checkpoint(
            "resnet18", str(tmp_path / "nope.pth"), str(tmp_path / "o"))
    with pytest.raises(ValueError, match="unknown model 'resnet19'"):
        convert.convert_torch_checkpoint("resnet19", resnet18_pth, str(tmp_path / "o"))
    assert nothing_written(str(tmp_path / "o"))


def test_output_that_holds_files_is_refused(resnet18_pth, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        convert.convert_torch_checkpoint("resnet18", resnet18_pth, str(out))
    assert os.listdir(out) == ["keep.txt"]


def test_missing_torch_gives_install_hint(monkeypatch, resnet18_pth):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match=r"pip install 'pyconv-jax\[torch\]'"):
        convert.load_torch_checkpoint(resnet18_pth)


def test_script_converts_or_exits_2_with_one_line(resnet18_pth, tmp_path):
    """The command line: a summary on success; on a wrong --arch one stderr line, exit 2."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))

    def start(arch, out):
        return subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "scripts", "convert_checkpoint.py"), "--arch",
             arch, "--torch_checkpoint", resnet18_pth, "--output", out],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    good, bad = str(tmp_path / "good"), str(tmp_path / "bad")
    procs = [start("resnet18", good), start("resnet34", bad)]  # run side by side
    (ok_out, ok_err), (bad_out, bad_err) = (p.communicate(timeout=300) for p in procs)
    assert procs[0].returncode == 0, ok_err
    assert "converted resnet18 (11,689,512 params, 1000 classes)" in ok_out and good in ok_out
    assert ckpt.read_meta(good)["model"] == "resnet18"
    assert procs[1].returncode == 2
    lines = [line for line in bad_err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), bad_err
    assert "does not match resnet34" in lines[0] and "use --arch resnet18" in lines[0]
    assert nothing_written(bad) and not bad_out


# ------------------------------------------------------------------ load_pretrained
@pytest.fixture(scope="module")
def resnet18_converted(resnet18_pth, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cache") / "resnet18")
    convert.convert_torch_checkpoint("resnet18", resnet18_pth, out)
    return out


def test_load_pretrained_from_cache_and_on_a_mesh(resnet18_converted, monkeypatch):
    monkeypatch.setenv("PYCONV_JAX_CACHE", os.path.dirname(resnet18_converted))
    assert pretrained.cache_dir("resnet18") == resnet18_converted
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    model, variables = pyconv_jax.load_pretrained("resnet18", mesh=mesh)
    assert model.num_classes == 1000
    leaf = variables["batch_stats"]["bn1"]["mean"]
    assert isinstance(leaf.sharding, jax.sharding.NamedSharding)
    assert leaf.sharding.mesh == mesh and leaf.sharding.is_fully_replicated


def test_load_pretrained_errors(resnet18_converted, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="holds 'resnet18', not 'resnet34'"):
        pyconv_jax.load_pretrained("resnet34", resnet18_converted)
    monkeypatch.setenv("PYCONV_JAX_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError) as info:
        pyconv_jax.load_pretrained("pyconvresnet50")
    message = str(info.value)
    cache = os.path.join(str(tmp_path / "cache"), "pyconvresnet50")
    assert "pyconvresnet50.pth" in message and "77.88%" in message and "iduta/pyconv" in message
    assert ("python scripts/convert_checkpoint.py --arch pyconvresnet50 --torch_checkpoint "
            f"pyconvresnet50.pth --output {cache}") in message
    with pytest.raises(FileNotFoundError, match="publish no ImageNet weights for pyconvresnet18"):
        pyconv_jax.load_pretrained("pyconvresnet18", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="unknown model"):
        pyconv_jax.load_pretrained("pyconvresnet51")


def test_pretrained_registry_matches_published_table():
    published = {n: s.published for n, s in MODEL_SPECS.items() if s.published.weights_file}
    assert sorted(pretrained.PRETRAINED) == sorted(published) and len(published) == 9
    for name, weights in pretrained.PRETRAINED.items():
        assert weights.weights_file == published[name].weights_file == f"{name}.pth"
        assert weights.top1 == published[name].top1
