"""Models adapted to CIFAR-10's 32x32 inputs, built from torchvision's architectures.

``build_model(name)`` looks the name up in :data:`MODELS`, a plain dict of builders.

* ``resnet18/34/50``: torchvision's ResNets with the CIFAR stem used by the seed thesis and by
  kuangliu/pytorch-cifar: a 3x3 stride-1 first convolution and no max-pool, so the 32x32 image
  reaches the first stage at full resolution (ImageNet's 7x7/2 stem and 3x3/2 pool would shrink it
  to 8x8).
* ``resnet20``: He et al. 2016's CIFAR ResNet (3 stages of 3 basic blocks, 16/32/64 channels),
  assembled from torchvision's ``BasicBlock``. Downsampling shortcuts are 1x1 convolutions
  (option B), which adds 2,752 parameters to the paper's 0.27M.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

# torchvision is imported inside the builders: it costs ~2.5 s, and the CLI needs only the names
# to parse its options and report a typo.


def _cifar_resnet(name: str) -> Callable[[int], nn.Module]:
    def build(num_classes: int = 10) -> nn.Module:
        from torchvision.models import resnet

        model = getattr(resnet, name)(num_classes=num_classes)
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
        return model

    return build


class ResNet20(nn.Module):
    """ResNet-20 for CIFAR (He et al. 2016, section 4.2), ~0.27M parameters."""

    def __init__(self, num_classes: int = 10, blocks_per_stage: int = 3):
        from torchvision.models.resnet import BasicBlock

        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        stages, width = [], 16
        for out, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(blocks_per_stage):
                down = None
                if i == 0 and (stride != 1 or width != out):
                    down = nn.Sequential(nn.Conv2d(width, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))
                blocks.append(BasicBlock(width, out, stride=stride if i == 0 else 1, downsample=down))
                width = out
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():  # torchvision's ResNet init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


MODELS: dict[str, Callable[[int], nn.Module]] = {
    "resnet20": ResNet20,
    "resnet18": _cifar_resnet("resnet18"),
    "resnet34": _cifar_resnet("resnet34"),
    "resnet50": _cifar_resnet("resnet50"),
}


def build_model(name: str, num_classes: int = 10) -> nn.Module:
    """A freshly initialised model from :data:`MODELS`, in FP32, for 32x32 inputs.

    Example::

        model = build_model("resnet20")
        model(torch.randn(2, 3, 32, 32)).shape  # torch.Size([2, 10])
    """
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name](num_classes)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
