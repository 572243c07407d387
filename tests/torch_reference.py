"""Independent PyTorch implementations of the published model layouts (reference for tests, bench).

Written from the architecture facts in ``shared/reference/official-models.md``, not from the Flax
code: torchvision's ResNet (max-pool stem, stride on the 3x3 conv, strided 1x1 projection
``downsample.0/.1``), PyConvResNet (no stem pool, every stage strides 2, shortcut max-pool -> 1x1
-> BN as ``downsample.0/.1/.2``) and PyConvHGResNet (doubled widths, expansion 2, wider groups).
Module names reproduce the published ``state_dict`` keys, so a model from
:func:`build_torch_model` saves exactly the file layout the authors released.

Only the depths, widths and pyramids (facts from the paper) are read from
:mod:`pyconv_jax.models.specs`. Importing this module has no side effects beyond importing torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pyconv_jax.models.specs import MODEL_SPECS


def conv_kxk(in_ch: int, out_ch: int, k: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """``k x k`` conv, padding ``k // 2``, no bias (every conv in these models)."""
    return nn.Conv2d(in_ch, out_ch, k, stride=stride, padding=k // 2, groups=groups, bias=False)


def level_widths(total: int, num_levels: int) -> list[int]:
    """The paper's output-channel split: 4 levels quarters, 3 levels 1/4 1/4 1/2, 2 halves."""
    if num_levels == 1:
        return [total]
    if num_levels == 2:
        return [total // 2, total // 2]
    if num_levels == 3:
        return [total // 4, total // 4, total // 2]
    if num_levels == 4:
        return [total // 4] * 4
    raise ValueError(f"no published channel split for {num_levels} levels")


class PyConvLevels(nn.Module):
    """A multi-level pyramidal conv: levels ``conv2_1 .. conv2_L`` on one input, concatenated."""

    def __init__(self, in_ch: int, out_ch: int, kernels: Sequence[int], groups: Sequence[int],
                 stride: int = 1):
        super().__init__()
        self.num_levels = len(kernels)
        for i, (k, g, w) in enumerate(
                zip(kernels, groups, level_widths(out_ch, len(kernels))), start=1):
            self.add_module(f"conv2_{i}", conv_kxk(in_ch, w, k, stride=stride, groups=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [getattr(self, f"conv2_{i}")(x) for i in range(1, self.num_levels + 1)], dim=1)


def pyconv(in_ch: int, out_ch: int, kernels: Sequence[int], groups: Sequence[int],
           stride: int = 1) -> nn.Module:
    """A one-level pyramid is a plain conv (``conv2.weight``); otherwise :class:`PyConvLevels`."""
    if len(kernels) == 1:
        return conv_kxk(in_ch, out_ch, kernels[0], stride=stride, groups=groups[0])
    return PyConvLevels(in_ch, out_ch, kernels, groups, stride)


# ------------------------------------------------------------------ blocks
class BasicBlock(nn.Module):
    """torchvision BasicBlock: 3x3 (stride) -> BN -> ReLU -> 3x3 -> BN, + shortcut."""

    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1 = conv_kxk(in_ch, width, 3, stride=stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv_kxk(width, width, 3)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision Bottleneck (v1.5): 1x1 -> 3x3 (stride) -> 1x1 (x4), BN + ReLU between."""

    def __init__(self, in_ch: int, width: int, stride: int, downsample: nn.Module | None,
                 expansion: int = 4):
        super().__init__()
        self.conv1 = conv_kxk(in_ch, width, 1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv_kxk(width, width, 3, stride=stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv_kxk(width, width * expansion, 1)
        self.bn3 = nn.BatchNorm2d(width * expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class PyConvBasicBlock2(nn.Module):
    """PyConvResNet-18/34 block: pyconv (stride) -> BN -> ReLU -> 1x1 -> BN, + shortcut."""

    def __init__(self, in_ch: int, width: int, stride: int, downsample: nn.Module | None,
                 kernels: Sequence[int], groups: Sequence[int], expansion: int = 1):
        super().__init__()
        self.conv1 = pyconv(in_ch, width, kernels, groups, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv_kxk(width, width * expansion, 1)
        self.bn2 = nn.BatchNorm2d(width * expansion)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class PyConvBottleneck(nn.Module):
    """PyConv bottleneck: 1x1 -> pyconv (stride) -> 1x1 (x expansion), BN + ReLU between."""

    def __init__(self, in_ch: int, width: int, stride: int, downsample: nn.Module | None,
                 kernels: Sequence[int], groups: Sequence[int], expansion: int = 4):
        super().__init__()
        self.conv1 = conv_kxk(in_ch, width, 1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = pyconv(width, width, kernels, groups, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv_kxk(width, width * expansion, 1)
        self.bn3 = nn.BatchNorm2d(width * expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


# ------------------------------------------------------------------ networks
class TorchvisionResNet(nn.Module):
    """torchvision layout: 7x7/2 stem, BN, ReLU, 3x3/2 max-pool; stages stride 1, 2, 2, 2."""

    def __init__(self, block: str, stage_sizes: Sequence[int], expansion: int,
                 num_classes: int = 1000, widths: Sequence[int] = (64, 128, 256, 512)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_ch = 64
        for s, (n, w) in enumerate(zip(stage_sizes, widths), start=1):
            stride = 1 if s == 1 else 2
            blocks = []
            for i in range(n):
                st = stride if i == 0 else 1
                downsample = None
                if st != 1 or in_ch != w * expansion:
                    downsample = nn.Sequential(
                        nn.Conv2d(in_ch, w * expansion, 1, stride=st, bias=False),
                        nn.BatchNorm2d(w * expansion))
                if block == "basic":
                    blocks.append(BasicBlock(in_ch, w, st, downsample))
                else:
                    blocks.append(Bottleneck(in_ch, w, st, downsample, expansion))
                in_ch = w * expansion
            self.add_module(f"layer{s}", nn.Sequential(*blocks))
        self.num_stages = len(stage_sizes)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for s in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{s}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


class PyConvResNet(nn.Module):
    """PyConvResNet / PyConvHGResNet: 7x7/2 stem, BN, ReLU (no pool); every stage strides 2.

    A stage's first block gets the published shortcut: ``MaxPool(3, 2, 1) -> 1x1 -> BN``
    (``downsample.0/.1/.2``) when it strides and widens, ``1x1 -> BN`` (``downsample.0/.1``)
    when it only widens, the max-pool alone when it only strides.
    """

    def __init__(self, block: str, stage_sizes: Sequence[int], widths: Sequence[int],
                 expansion: int, kernels: Sequence[Sequence[int]],
                 groups: Sequence[Sequence[int]], num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        block_cls = PyConvBasicBlock2 if block == "basic" else PyConvBottleneck
        in_ch = 64
        for s, (n, w) in enumerate(zip(stage_sizes, widths), start=1):
            out_ch = w * expansion
            blocks = []
            for i in range(n):
                stride = 2 if i == 0 else 1
                if stride != 1 and in_ch != out_ch:
                    downsample = nn.Sequential(
                        nn.MaxPool2d(3, stride=stride, padding=1),
                        conv_kxk(in_ch, out_ch, 1),
                        nn.BatchNorm2d(out_ch))
                elif in_ch != out_ch:
                    downsample = nn.Sequential(conv_kxk(in_ch, out_ch, 1), nn.BatchNorm2d(out_ch))
                elif stride != 1:
                    downsample = nn.MaxPool2d(3, stride=stride, padding=1)
                else:
                    downsample = None
                blocks.append(block_cls(in_ch, w, stride, downsample, kernels[s - 1],
                                        groups[s - 1], expansion))
                in_ch = out_ch
            self.add_module(f"layer{s}", nn.Sequential(*blocks))
        self.num_stages = len(stage_sizes)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        for s in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{s}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_torch_model(name: str, num_classes: int = 1000) -> nn.Module:
    """The published PyTorch layout of registered model ``name`` (depths, pyramids: the specs)."""
    spec = MODEL_SPECS[name]
    if spec.family == "resnet":
        return TorchvisionResNet(spec.block, spec.stage_sizes, spec.expansion, num_classes,
                                 widths=spec.stage_widths)
    return PyConvResNet(spec.block, spec.stage_sizes, spec.stage_widths, spec.expansion,
                        spec.pyconv_kernels, spec.pyconv_groups, num_classes)


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fills every weight AND BatchNorm running statistic with random values, in place.

    Convs: He-normal (fan-in); BN weight ~U(0.5, 1.5), bias ~N(0, 0.1), running mean ~N(0, 0.1),
    running var ~U(0.5, 1.5); fc: N(0, 1/fan_in), bias N(0, 0.1). Eval-mode outputs then depend
    on every tensor in the checkpoint, so a mis-mapped one shows up in the logits.
    """
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.weight.normal_(0.0, (2.0 / m.weight[0].numel()) ** 0.5, generator=gen)
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.uniform_(0.5, 1.5, generator=gen)
            m.bias.normal_(0.0, 0.1, generator=gen)
            m.running_mean.normal_(0.0, 0.1, generator=gen)
            m.running_var.uniform_(0.5, 1.5, generator=gen)
        elif isinstance(m, nn.Linear):
            m.weight.normal_(0.0, (1.0 / m.in_features) ** 0.5, generator=gen)
            m.bias.normal_(0.0, 0.1, generator=gen)
    return model


def random_torch_model(name: str, num_classes: int = 1000, seed: int = 0) -> nn.Module:
    """:func:`build_torch_model` with random weights and BN statistics (see :func:`randomize_`),
    in eval mode. Skips PyTorch's default initialisation (built on the meta device)."""
    with torch.device("meta"):
        model = build_torch_model(name, num_classes)
    model = model.to_empty(device="cpu")
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.num_batches_tracked.zero_()
    return randomize_(model, seed).eval()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "BasicBlock", "Bottleneck", "PyConvBasicBlock2", "PyConvBottleneck", "PyConvLevels",
    "PyConvResNet", "TorchvisionResNet", "build_torch_model", "count_parameters", "level_widths",
    "pyconv", "random_torch_model", "randomize_",
]
