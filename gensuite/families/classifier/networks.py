"""Classifier networks: logits for the objective, penultimate features for feature-space metrics."""

from __future__ import annotations

import torch
from torch import nn


class Classifier(nn.Module):
    def __init__(self, shape: tuple[int, ...], num_classes: int, architecture: str, hidden: list[int],
                 channels: list[int], dropout: float):
        super().__init__()
        if architecture == "conv":
            layers: list[nn.Module] = []
            c_in = shape[0]
            for c in channels:  # two 3x3 conv-BN-ReLU, then halve the resolution
                layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(True),
                           nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(True),
                           nn.MaxPool2d(2)]
                c_in = c
            layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout)]
            width = c_in
        else:
            dim = 1
            for s in shape:
                dim *= s
            layers, width = [nn.Flatten()], dim
            for h in hidden:
                layers += [nn.Linear(width, h), nn.ReLU(True), nn.Dropout(dropout)]
                width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))
