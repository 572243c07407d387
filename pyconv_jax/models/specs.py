"""Every registered architecture, described once.

This is the single source of truth for model structure (depths, widths, pyramids, stem and
shortcut style) and for the facts published about each model (parameter count, MACs at 224x224,
number of PyTorch state_dict entries, ImageNet top-1). The registry, the converter, the counting
table and the tests all read from here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

# Pyramids per stage, from the paper (Table/Fig. "PyConvResNet" and "PyConvHGResNet").
PYCONV_KERNELS = ((3, 5, 7, 9), (3, 5, 7), (3, 5), (3,))
PYCONV_GROUPS = ((1, 4, 8, 16), (1, 4, 8), (1, 4), (1,))
PYCONVHG_GROUPS = ((32, 32, 32, 32), (32, 64, 64), (32, 64), (32,))
PLAIN_KERNELS = ((3,), (3,), (3,), (3,))
PLAIN_GROUPS = ((1,), (1,), (1,), (1,))

RESNET_WIDTHS = (64, 128, 256, 512)
PYCONVHG_WIDTHS = (128, 256, 512, 1024)


@dataclasses.dataclass(frozen=True)
class Published:
    """Facts about the authors' published model (see shared/reference/official-models.md)."""

    params: int
    gmacs: float  # conv + fc multiply-adds at 224x224, in 1e9
    state_dict_entries: int
    top1: float | None = None  # ImageNet val, single 224 crop after resize 256, percent
    weights_file: str | None = None  # file name of the authors' released .pth


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Structure of one registered model; ``model_kwargs`` feeds :class:`ResNet`."""

    name: str
    family: str  # "resnet" | "pyconvresnet" | "pyconvhgresnet"
    block: str  # "basic" | "bottleneck"
    stage_sizes: tuple[int, ...]
    published: Published
    stage_widths: tuple[int, ...] = RESNET_WIDTHS
    expansion: int = 4
    pyconv_kernels: tuple[tuple[int, ...], ...] = PLAIN_KERNELS
    pyconv_groups: tuple[tuple[int, ...], ...] = PLAIN_GROUPS

    @property
    def is_pyconv(self) -> bool:
        return self.family != "resnet"

    def model_kwargs(self) -> dict[str, Any]:
        """Constructor arguments of :class:`pyconv_jax.models.resnet.ResNet` for this model."""
        pyconv = self.is_pyconv
        return dict(
            stage_sizes=self.stage_sizes,
            block=self.block,
            stage_widths=self.stage_widths,
            expansion=self.expansion,
            pyconv_kernels=self.pyconv_kernels,
            pyconv_groups=self.pyconv_groups,
            # torchvision ResNet: max-pool in the stem, stride 1 in stage 1, 1x1 strided projection.
            # PyConv families: no stem pool, every stage strides, max-pool then 1x1 projection.
            stem_pool=not pyconv,
            stage_strides=(2, 2, 2, 2) if pyconv else (1, 2, 2, 2),
            shortcut="pool" if pyconv else "projection",
            basic_second_kernel=1 if pyconv else 3,
        )


def _resnet(name, block, sizes, expansion, published):
    return ModelSpec(name, "resnet", block, sizes, published, expansion=expansion)


def _pyconv(name, block, sizes, expansion, published):
    return ModelSpec(
        name, "pyconvresnet", block, sizes, published, expansion=expansion,
        pyconv_kernels=PYCONV_KERNELS, pyconv_groups=PYCONV_GROUPS,
    )


def _pyconvhg(name, sizes, published):
    return ModelSpec(
        name, "pyconvhgresnet", "bottleneck", sizes, published, stage_widths=PYCONVHG_WIDTHS,
        expansion=2, pyconv_kernels=PYCONV_KERNELS, pyconv_groups=PYCONVHG_GROUPS,
    )


_SPECS = (
    _resnet("resnet18", "basic", (2, 2, 2, 2), 1, Published(11_689_512, 1.814, 122)),
    _resnet("resnet34", "basic", (3, 4, 6, 3), 1, Published(21_797_672, 3.664, 218)),
    _resnet("resnet50", "bottleneck", (3, 4, 6, 3), 4,
            Published(25_557_032, 4.089, 320, 76.12, "resnet50.pth")),
    _resnet("resnet101", "bottleneck", (3, 4, 23, 3), 4,
            Published(44_549_160, 7.801, 626, 78.00, "resnet101.pth")),
    _resnet("resnet152", "bottleneck", (3, 8, 36, 3), 4,
            Published(60_192_808, 11.514, 932, 78.45, "resnet152.pth")),
    _pyconv("pyconvresnet18", "basic", (2, 2, 2, 2), 1, Published(5_911_976, 0.863, 134)),
    _pyconv("pyconvresnet34", "basic", (3, 4, 6, 3), 1, Published(11_091_048, 1.735, 241)),
    _pyconv("pyconvresnet50", "bottleneck", (3, 4, 6, 3), 4,
            Published(24_847_720, 3.820, 343, 77.88, "pyconvresnet50.pth")),
    _pyconv("pyconvresnet101", "bottleneck", (3, 4, 23, 3), 4,
            Published(42_307_944, 7.232, 666, 79.01, "pyconvresnet101.pth")),
    _pyconv("pyconvresnet152", "bottleneck", (3, 8, 36, 3), 4,
            Published(56_640_872, 10.606, 993, 79.52, "pyconvresnet152.pth")),
    _pyconvhg("pyconvhgresnet50", (3, 4, 6, 3),
              Published(25_234_728, 4.534, 343, 78.48, "pyconvhgresnet50.pth")),
    _pyconvhg("pyconvhgresnet101", (3, 4, 23, 3),
              Published(44_627_240, 8.321, 666, 79.22, "pyconvhgresnet101.pth")),
    _pyconvhg("pyconvhgresnet152", (3, 8, 36, 3),
              Published(60_657_960, 12.153, 993, 79.36, "pyconvhgresnet152.pth")),
)

MODEL_SPECS: dict[str, ModelSpec] = {spec.name: spec for spec in _SPECS}
