"""Shared fixtures: tiny torchvision-style ResNets (same module names as torchvision) for fast CPU tests."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck


class TinyResNet(nn.Module):
    """torchvision's ResNet layout (conv1, bn1, layer1..4, fc) with small widths and a 3x3 stem for 16-32 px inputs."""

    def __init__(self, block=BasicBlock, layers=(1, 1, 1, 1), widths=(8, 16, 16, 32), num_classes=10):
        super().__init__()
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make(block, widths[0], layers[0], 1)
        self.layer2 = self._make(block, widths[1], layers[1], 2)
        self.layer3 = self._make(block, widths[2], layers[2], 2)
        self.layer4 = self._make(block, widths[3], layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3] * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 0.5)
                nn.init.normal_(m.bias, 0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)

    def _make(self, block, planes, blocks, stride):
        down = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            down = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                 nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, down)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def tiny_basic(seed: int = 0) -> TinyResNet:
    torch.manual_seed(seed)
    return TinyResNet(BasicBlock, (2, 1, 1, 1))


def tiny_bottleneck(seed: int = 0) -> TinyResNet:
    torch.manual_seed(seed)
    return TinyResNet(Bottleneck, (2, 1, 2, 1), widths=(8, 8, 16, 16))


@pytest.fixture(params=["basic", "bottleneck"])
def tiny_model(request):
    return tiny_basic() if request.param == "basic" else tiny_bottleneck()
