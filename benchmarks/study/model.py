"""The network every method of the accuracy study trains: a small CIFAR-style ResNet made of torchvision blocks.

It uses torchvision's ``BasicBlock`` and torchvision's module names (``conv1``, ``bn1``, ``layerK.i``, ``fc``), so
``chex_core.resnet_groups`` finds its channel groups exactly as it does for ResNet-18/50, and Torch-Pruning's
dependency graph sees an ordinary residual network.
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock


class CifarResNet(nn.Module):
    """CIFAR-style ResNet with torchvision ``BasicBlock``s (3×3 stem, 3 stages at strides 1/2/2, pool, linear).

    Input ``(N, in_ch, H, W)`` → logits ``(N, num_classes)``. Stages run at H, H/2, H/4.
    """

    def __init__(self, blocks: int = 2, widths: tuple[int, int, int] = (16, 32, 64), in_ch: int = 1,
                 num_classes: int = 10) -> None:
        super().__init__()
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(in_ch, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._stage(widths[0], blocks, 1)
        self.layer2 = self._stage(widths[1], blocks, 2)
        self.layer3 = self._stage(widths[2], blocks, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        down = None
        if stride != 1 or self.inplanes != planes:
            down = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, down)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_model(cfg: dict, seed: int, num_classes: int, in_ch: int = 1) -> CifarResNet:
    """The dense network of one run; ``seed`` fixes its initialisation (the same for every method)."""
    torch.manual_seed(seed)
    return CifarResNet(cfg["blocks"], tuple(cfg["widths"]), in_ch=in_ch, num_classes=num_classes)
